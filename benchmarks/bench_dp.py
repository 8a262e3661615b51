"""Data parallel: output tokens/s at DP=1 and DP=2 (one replica per raylet), same prompts.

Starts its own raylets on loopback addresses (one METAL unit each), runs the ``dp``
scenario of ``vllm_ray_metal.testing.scenarios`` (AsyncLLM, Ray DP backend) for each DP
size, writes
``benchmarks/results/data_parallel.json`` (``.smoke.json`` under 16 prompts) and
regenerates BENCHMARKS.md.

    python benchmarks/bench_dp.py                       # 16 prompts x 32 tokens
    python benchmarks/bench_dp.py --prompts 4 --tokens 8 --ips 127.0.0.78,127.0.0.79

On one machine all raylets share its cores, so DP only helps as far as one replica
leaves cores idle; on several Macs each replica has its own.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vllm_ray_metal.testing import scenarios  # noqa: E402
from vllm_ray_metal.testing.cluster import LocalRayCluster  # noqa: E402
from vllm_ray_metal.testing.models import chat_token_ids  # noqa: E402

NOTE = ("DP: the raylets of bench_dp.py share one machine's cores, so replicas compete for "
        "them; the ratio says DP works without overhead, not what several Macs give.")
TOPICS = ["the ocean", "a city at night", "mountains", "a robot", "coffee", "winter",
          "a library", "trains"]


def run(cluster: LocalRayCluster, prompts: list[list[int]], tokens: int, dp: int) -> dict:
    opts = {"prompts": prompts, "max_tokens": tokens, "engine": {"data_parallel_size": dp}}
    res = scenarios.run("dp", cluster, opts=opts, timeout=1200).result
    if "error" in res:
        raise RuntimeError(res.get("traceback", res["error"]))
    return res


def main() -> None:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--ips", default="127.0.0.78,127.0.0.79")
    args = p.parse_args()

    from vllm_ray_metal import default_model

    model = default_model()
    texts = [f"Write a short story about {TOPICS[i % len(TOPICS)]} (variant {i})."
             for i in range(args.prompts)]
    prompts = chat_token_ids(model, texts)
    nodes = [(ip, {"METAL": 1}) for ip in args.ips.split(",")]
    rows = []
    with LocalRayCluster(nodes).start(timeout=240) as cluster:
        for dp in (1, 2):
            t0 = time.perf_counter()
            res = run(cluster, prompts, args.tokens, dp)
            rows.append({"data_parallel_size": dp, "tokens_per_s": res["tokens_per_s"],
                         "generate_s": res["generate_s"], "ready_s": res["ready_s"],
                         "requests_per_engine": {str(e): list(res["served_by"].values())
                                                 .count(e) for e in range(dp)},
                         "worker_hosts": [w["host_ip"] for r in res["replicas"] for w in r],
                         "wall_s": time.perf_counter() - t0,
                         "outputs_equal_dp1": res["outputs"] == rows[0]["outputs"]
                         if rows else True, "outputs": res["outputs"]})
            print(f"DP={dp}: {res['tokens_per_s']:.1f} tok/s "
                  f"({args.prompts} prompts x {args.tokens} tokens)", flush=True)
    report = {"model": Path(model).name, "prompts": args.prompts, "new_tokens": args.tokens,
              "speedup_dp2": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"],
              "results": [{k: v for k, v in r.items() if k != "outputs"} for r in rows]}
    report["rows"] = [{
        "id": "DP", "target": "-", "ratio": f"{report['speedup_dp2']:.2f}",
        "measure": f"output tok/s, DP=2 ÷ DP=1 ({args.prompts} prompts x {args.tokens} "
                   "tokens, one replica per raylet, same machine)",
        "figure": f"{rows[1]['tokens_per_s']:.1f} vs {rows[0]['tokens_per_s']:.1f} tok/s"}]
    report["notes"] = [NOTE]
    path = common.save("data_parallel", report, smoke=args.prompts < 16)
    common.write_markdown()
    print(path.read_text())


if __name__ == "__main__":
    main()
