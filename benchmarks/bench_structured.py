"""P7: json_schema-constrained decode tok/s at 16 concurrent ÷ unconstrained, same prompts.

One engine (vLLM LLM + RayMetalExecutor, TP=1, default model) runs 16 JSON requests
(the four test schemas, cycled) under their schemas at temperature 0, then the same
prompts unconstrained with each request's ``max_tokens`` set to the length its
constrained answer had (``ignore_eos``), so both runs generate exactly the same number of
tokens per request. The grammar cache is warm (a first constrained pass compiles each
schema once, as a server sees the same schemas again and again).

    python benchmarks/bench_structured.py            # full run (a few minutes here)
    python benchmarks/bench_structured.py --smoke    # seconds: 2 requests, 1 repeat
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def child(concurrent: int, max_tokens: int, repeats: int, backend: str) -> dict:
    import ray
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from vllm_ray_metal import RayMetalExecutor, default_model
    from vllm_ray_metal.testing.structured import JSON_SCHEMAS, PROMPTS

    ray.init(address="local", resources={"METAL": 1}, include_dashboard=False,
             logging_level="ERROR")
    llm = LLM(model=default_model(), max_model_len=1024, max_num_seqs=64, dtype="float32",
              distributed_executor_backend=RayMetalExecutor, kv_cache_memory_bytes=1 << 30,
              structured_outputs_config={"backend": backend})
    names = [list(JSON_SCHEMAS)[i % len(JSON_SCHEMAS)] for i in range(concurrent)]
    chats = [[{"role": "user", "content": PROMPTS[n]}] for n in names]
    constrained = [SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                  structured_outputs=StructuredOutputsParams(
                                      json=JSON_SCHEMAS[n])) for n in names]

    def timed(params) -> tuple[float, list[int]]:
        t = time.perf_counter()
        outs = llm.chat(chats, params, use_tqdm=False)
        return time.perf_counter() - t, [len(o.outputs[0].token_ids) for o in outs]

    _, lengths = timed(constrained)  # warm-up: compiles each schema, fixes the lengths
    free = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    timed(free)
    rates: dict[str, list[float]] = {"constrained": [], "unconstrained": []}
    for _ in range(repeats):  # interleaved, so drift on this VM hits both alike
        for kind, params in (("constrained", constrained), ("unconstrained", free)):
            seconds, got = timed(params)
            assert got == lengths, (kind, got, lengths)
            rates[kind].append(sum(got) / seconds)
    return {"system": "ours", "backend": backend, "lengths": lengths,
            "tok_s": {k: common.median(v) for k, v in rates.items()}, "runs": rates}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="xgrammar")
    args = ap.parse_args()
    if args.smoke:
        args.concurrent, args.max_tokens, args.repeats = 2, 24, 1
    if args.child:
        common.emit(child(args.concurrent, args.max_tokens, args.repeats, args.backend))
        return
    res = common.run_child(__file__, "ours", [
        "--concurrent", str(args.concurrent), "--max-tokens", str(args.max_tokens),
        "--repeats", str(args.repeats), "--backend", args.backend])
    if "error" in res:
        raise SystemExit(f"ours failed:\n{res['error']}")
    con, free = res["tok_s"]["constrained"], res["tok_s"]["unconstrained"]
    rows = [{"id": "P7", "measure": f"json_schema-constrained decode tok/s at "
             f"{args.concurrent} concurrent ÷ unconstrained, same prompts and token counts "
             f"({args.backend})",
             "figure": f"{con:.1f} vs {free:.1f} tok/s", "ratio": f"{con / free:.2f}",
             "target": "≥ 0.9"}]
    payload = {"results": {"ours": res}, "rows": rows, "concurrent": args.concurrent,
               "repeats": args.repeats}
    runs = res["runs"]
    common.publish("structured", payload, args.smoke, "Constrained vs free decoding",
                   {k: (list(range(1, len(v) + 1)), v) for k, v in runs.items()},
                   "repeat", "output tok/s")


if __name__ == "__main__":
    main()
