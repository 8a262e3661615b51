"""P4 and P5: seconds until LLM(...) is ready, and seconds to a clear placement error.

  P4  ours: LLM + RayMetalExecutor on an already running Ray cluster (Ray start excluded)
      vllm-cpu: vLLM's own CPU backend, same model (its profiling and warm-up included)
  P5  ours on a running cluster that has no METAL unit: time until PlacementError

    python benchmarks/bench_startup.py             # full run (several minutes)
    python benchmarks/bench_startup.py --smoke     # ours only, one repeat
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


NOTE = ('vllm-cpu runs with VLLM_CPU_KVCACHE_SPACE=1 (a fixed 1 GiB KV cache), which makes it skip its warm-up pass: 25-29 s here, not the 111 s of its default start. Both starts are dominated by processes that import vLLM and torch (ours: the engine core, then the Ray worker actor); 0.3 would need pre-started workers or an in-process engine core (not done).')


def child(system: str, repeats: int) -> dict:
    from vllm import LLM

    from vllm_ray_metal import default_model

    model = default_model()
    times, errors = [], []
    if system == "vllm-cpu":
        for _ in range(repeats):
            t = time.perf_counter()
            llm = LLM(model=model, max_model_len=1024, dtype="float32", enforce_eager=True)
            times.append(time.perf_counter() - t)
            llm.llm_engine.engine_core.shutdown()
            del llm
        return {"system": system, "ready_s": times}

    import ray

    from vllm_ray_metal import RayMetalExecutor

    key = {"ours": {"METAL": 1}, "unplaceable": {}}[system]
    ray.init(resources=key, include_dashboard=False, logging_level="ERROR")
    for _ in range(repeats):
        t = time.perf_counter()
        try:
            llm = LLM(model=model, max_model_len=1024, kv_cache_memory_bytes=1 << 30,
                      distributed_executor_backend=RayMetalExecutor)
        except Exception as exc:  # P5 expects the PlacementError
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
            times.append(time.perf_counter() - t)
            continue
        times.append(time.perf_counter() - t)
        llm.llm_engine.engine_core.shutdown()
        del llm
    return {"system": system, "ready_s": times, "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.smoke:
        args.repeats = 1
    if args.child:
        common.emit(child(args.child, args.repeats))
        return
    systems = ["ours", "unplaceable"] + ([] if args.smoke else ["vllm-cpu"])
    env = {"vllm-cpu": {"VLLM_RAY_METAL_DISABLE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}}
    res = {s: common.run_child(__file__, s, ["--repeats", str(args.repeats)], env.get(s))
           for s in systems}
    for s, r in res.items():
        if "error" in r:
            raise SystemExit(f"{s} failed:\n{r['error']}")
    if not all(e.startswith("PlacementError") for e in res["unplaceable"]["errors"]) or \
            len(res["unplaceable"]["errors"]) != args.repeats:
        raise SystemExit(f"unplaceable cluster did not raise PlacementError: {res['unplaceable']}")
    ours = common.median(res["ours"]["ready_s"])
    fail = common.median(res["unplaceable"]["ready_s"])
    rows = [{"id": "P5", "measure": "seconds to a clear error on an unplaceable cluster",
             "figure": f"{fail:.2f} s", "ratio": "-", "target": "≤ 10 s"}]
    if "vllm-cpu" in res:
        cpu = common.median(res["vllm-cpu"]["ready_s"])
        rows.insert(0, {"id": "P4", "measure": "seconds until LLM(...) is ready, ours on a "
                        "running cluster ÷ vllm-cpu native", "figure": f"{ours:.1f} s vs "
                        f"{cpu:.1f} s", "ratio": f"{ours / cpu:.2f}", "target": "≤ 0.3"})
    notes = [NOTE]
    path = common.save("startup", {"results": res, "rows": rows, "notes": notes}, args.smoke)
    common.plot(path.with_suffix(".png"), "Start-up seconds (median)",
                {s: ([i + 1 for i in range(len(r["ready_s"]))], r["ready_s"])
                 for s, r in res.items()}, "run", "seconds")
    if not args.smoke:
        common.write_markdown()
    print(path)


if __name__ == "__main__":
    main()
