"""Smoke runs of the benchmark scripts (tiny sizes) so they cannot rot. Not timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


# Offline engines run vLLM's engine core in the script's process (a spawned core imports
# vLLM again): the scripts' code is the same, without that second import.
IN_PROCESS = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def run_smoke(script: str, env: dict | None = IN_PROCESS) -> dict:
    out = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True,
                         text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.name.endswith(".smoke.json") and path.with_suffix(".png").is_file()
    return json.loads(path.read_text())


def test_throughput_smoke():
    data = run_smoke("bench_throughput.py")
    for system in ("ours", "mlx-lm"):
        rates = data["results"][system]["tok_s"]
        assert set(rates) == {"1", "2"} and all(v > 0 for v in rates.values())
    assert data["rows"][0]["id"] == "P1"


def test_startup_smoke():
    data = run_smoke("bench_startup.py")
    assert data["results"]["ours"]["ready_s"][0] > 0
    assert data["results"]["unplaceable"]["errors"][0].startswith("PlacementError")
    assert data["rows"][-1]["id"] == "P5"


def test_tp_scaling_smoke():
    data = run_smoke("bench_tp.py")
    one, two = data["results"]["tp1"], data["results"]["tp2"]
    assert set(one["by_prompts"]) == set(two["by_prompts"]) == {"2", "3"}  # the sizes
    for res in (one, two):
        for size in res["by_prompts"].values():
            assert size["tok_s"] > 0 and size["wall_ms_per_step"] > 0
    assert data["same_tokens"]  # TP=2 decodes what TP=1 does, at every size
    assert len({r["host_ip"] for r in two["ranks"]}) == 2
    # the CPU split found each rank's threads: one rank for TP=1, two for TP=2 (whole
    # runs' CPU only: thread times come in 10 ms ticks, a smoke step is shorter)
    assert len(one["by_prompts"]["2"]["rank_cpu"]) == 1
    cpu = two["by_prompts"]["2"]["rank_cpu"]
    assert len(cpu) == 2
    assert all(r["compute_ms"] + r["main_ms"] + r["other_ms"] > 0 for r in cpu)
    assert [r["id"] for r in data["rows"]] == ["P3", "P3", "P3 why"]


def test_blas_kernel_smoke():
    data = run_smoke("bench_blas.py")
    assert len(data["results"]) == 4  # OpenBLAS and the kernel, 1 and 2 threads
    assert all(ms > 0 for by_rows in data["results"].values() for ms in by_rows.values())
    assert data["rows"][0]["id"] == "B1"


def test_tp_profile_smoke():
    data = run_smoke("profile_tp.py")
    assert set(data["step_ms"]) == {"tp1", "tp2-alone", "tp2-shared", "tp2", "tp2-timed"}
    assert all(ms > 0 for ms in data["step_ms"].values())
    assert len(data["results"]["tp2-alone"]) == 1 and len(data["results"]["tp2"]) == 2
    # each decode step all-reduces after the attention and the MLP of its 2 layers
    assert data["all_reduce"]["calls"] == 4 * 3 and data["all_reduce"]["latency_mean_ms"] > 0
    assert [r["id"] for r in data["rows"]] == ["P3 why", "P3 why"]


def test_structured_smoke():
    data = run_smoke("bench_structured.py")
    res = data["results"]["ours"]
    assert len(res["lengths"]) == 2 and all(n > 0 for n in res["lengths"])
    assert res["tok_s"]["constrained"] > 0 and res["tok_s"]["unconstrained"] > 0
    assert data["rows"][0]["id"] == "P7"


def test_longctx_smoke():
    data = run_smoke("bench_longctx.py")
    for system in ("ours", "mlx-lm"):
        res = data["results"][system]
        for measure in ("prefill", "decode"):
            assert set(res[measure]) == {"72x1", "72x2"}
            assert all(v > 0 for v in res[measure].values())
    assert {r["id"] for r in data["rows"]} >= {"L-dec 72x1", "L-pre 72x2"}


def test_exp_profile_smoke():
    data = run_smoke("profile_exp.py")
    assert all(ns > 0 for ns in data["results"]["elementwise_ns"].values())
    attention = data["results"]["attention"]
    assert set(attention) == {"64", "128"}
    for point in attention.values():
        assert point["sdpa_ms"] > 0 and point["numpy_softmax_ms"] > 0
        assert point["max_abs_diff"] < 1e-4  # the numpy variant computes SDPA's attention
    assert [r["id"] for r in data["rows"]] == ["L why", "L why"]


def test_serve_smoke():
    """`vllm bench serve` (vLLM's own client) against our server, tiny sizes."""
    data = run_smoke("bench_serve.py", env=None)
    (run,) = data["results"]["ours"].values()
    assert run["completed"] == 4 and run["output_tok_s"] > 0
    assert run["ttft_p50_ms"] > 0 and run["tpot_p50_ms"] > 0


def test_spec_smoke():
    data = run_smoke("bench_spec.py")
    res = data["results"]
    assert data["same_tokens_with_and_without"]  # speculation changes speed, not tokens
    assert res["ours-ngram"]["acceptance_length"] >= 1
    # the model as its own draft: every proposal accepted, in both stacks
    assert res["ours-draft"]["acceptance_length"] == res["mlx-lm-draft"]["acceptance_length"] \
        == 5
    for system in ("ours-ngram", "ours-draft", "ours", "mlx-lm", "mlx-lm-draft"):
        assert len(res[system]["grounded_tok_s"]) == 1  # the smoke's one grounded ask
        assert all(v > 0 for v in res[system]["grounded_tok_s"])
    assert [r["id"] for r in data["rows"]] == ["P6 grounded", "P6 batched", "P8 draft"]


def test_lora_smoke():
    data = run_smoke("bench_lora.py")
    rates = data["results"]["lora-on"]["tok_s"]
    assert set(rates) == {"base", "adapters"} and all(v > 0 for v in rates.values())
    assert data["rows"][0]["id"] == "L1"
