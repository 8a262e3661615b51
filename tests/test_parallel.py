"""Tensor parallelism across raylets on distinct loopback addresses (MLX ring)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import config_error
from ray_cluster import LocalRayCluster
from test_model_runner import hf_greedy

SCENARIOS = Path(__file__).with_name("ray_scenarios.py")
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def four_units():
    # four raylets, one METAL unit each (the head too): every rank gets its own address
    with LocalRayCluster.one_unit_each(12, 13, 14, 15).start(timeout=240) as c:
        yield c


def generate(c: LocalRayCluster, model: str, tp: int, prompts: list[list[int]]) -> dict:
    opts = {"model": model, "prompts": prompts, "max_tokens": NEW_TOKENS,
            "llm": {"tensor_parallel_size": tp}}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, str(SCENARIOS), "gen", c.address, c.head_ip, "class",
                          json.dumps(opts)], capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in res, res.get("traceback", "") + out.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def tiny_tp1(four_units, tiny, prompts):
    return generate(four_units, tiny, 1, prompts)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_equals_tp1_with_ranks_on_different_nodes(four_units, tiny, prompts, tiny_tp1, tp):
    res = generate(four_units, tiny, tp, prompts)
    assert res["outputs"] == tiny_tp1["outputs"]
    assert all(len(o) == NEW_TOKENS for o in res["outputs"])
    workers = res["workers"]
    assert [w["rank"] for w in workers] == list(range(tp))
    assert len({w["host_ip"] for w in workers}) == tp  # one rank per raylet address
    assert all(w["group_size"] == tp for w in workers)
    assert all(w["vocab_split"] for w in workers)  # each rank projects onto 1/tp of the vocab
    # each rank holds 1/tp of the decoder weights (embeddings stay replicated)
    full = tiny_tp1["workers"][0]["layer_weight_bytes"]
    for w in workers:
        assert abs(w["layer_weight_bytes"] - full / tp) / (full / tp) < 0.02


def test_tp3_on_default_model_equals_reference(four_units, model_dir, prompts):
    """SmolLM2 (9 heads / 3 KV heads) at TP=3 gives transformers' (= our TP=1) tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    res = generate(four_units, model_dir, 3, prompts)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert res["outputs"] == [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    assert len({w["host_ip"] for w in res["workers"]}) == 3
    assert all(w["vocab_split"] for w in res["workers"])


def test_tp_not_dividing_kv_heads_names_valid_sizes(tiny):
    msg = config_error(tiny, max_model_len=256, tensor_parallel_size=8)
    assert "valid sizes: 1, 2, 4" in msg


def test_model_family_without_shard_is_rejected(tmp_path, model_dir):
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_head": 4,
           "n_embd": 64, "n_layer": 2, "vocab_size": 49152, "n_positions": 512}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"wte.weight": np.zeros((1, 1), np.float32)}, str(tmp_path / "model.safetensors"))
    for f in Path(model_dir).glob("tokenizer*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    msg = config_error(str(tmp_path), max_model_len=256, tensor_parallel_size=2)
    assert "has no shard() method" in msg


def test_more_ranks_than_units_fails_fast(tiny, prompts):
    with LocalRayCluster([("127.0.0.16", {}), ("127.0.0.17", {"METAL": 1})]) as c:
        opts = {"model": tiny, "prompts": prompts[:1], "llm": {"tensor_parallel_size": 2}}
        out = subprocess.run([sys.executable, str(SCENARIOS), "gen", c.address, c.head_ip,
                              "class", json.dumps(opts)], capture_output=True, text=True,
                             timeout=300)
    res = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert res["error"].startswith("PlacementError") and res["error_s"] < 10
    assert "1 unit(s) of 'METAL'" in res["error"] and "127.0.0.17" in res["error"]
