"""L1: decode tok/s of 16 concurrent requests spread over 4 LoRA adapters ÷ the same 16
requests on the base model, same prompts and token counts.

One engine (vLLM LLM + RayMetalExecutor, TP=1, default model, fp32) with ``enable_lora``,
four adapter slots and four adapters made here (two in PEFT's format on every projection,
two in mlx-lm's on the last 16 layers, rank 8); each request runs ``max_tokens`` with
``ignore_eos``. The base runs on the same engine (no adapter rows) and, in a second process,
on an engine with LoRA off, so the cost of serving adapters and of merely enabling LoRA
are both visible. Runs are interleaved (drift on this VM hits all alike); medians.

    python benchmarks/bench_lora.py            # full run (a few minutes here)
    python benchmarks/bench_lora.py --smoke    # seconds: 4 requests, 2 adapters, 1 repeat
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def make_adapters(count: int, where: Path) -> list[str]:
    from vllm_ray_metal import default_model
    from vllm_ray_metal.testing import lora

    model = default_model()
    return [lora.peft_adapter(where / f"peft{i}", model, seed=i, size=0.1) if i % 2 == 0
            else lora.mlx_lm_adapter(where / f"mlx{i}", model, rank=8, seed=i, size=0.05)
            for i in range(count)]


def child(system: str, concurrent: int, adapters: list[str], max_tokens: int,
          repeats: int) -> dict:
    import ray
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from vllm_ray_metal import RayMetalExecutor, default_model
    from vllm_ray_metal.testing.models import CHAT_PROMPTS

    ray.init(address="local", resources={"METAL": 1}, include_dashboard=False,
             logging_level="ERROR")
    lora = {"enable_lora": True, "max_loras": len(adapters), "max_lora_rank": 8} \
        if system == "lora-on" else {}
    llm = LLM(model=default_model(), max_model_len=1024, max_num_seqs=64, dtype="float32",
              distributed_executor_backend=RayMetalExecutor, kv_cache_memory_bytes=1 << 30,
              **lora)
    chats = [[{"role": "user", "content": CHAT_PROMPTS[i % len(CHAT_PROMPTS)]}]
             for i in range(concurrent)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapters)]
    kinds = {"base": None}
    if lora:
        kinds["adapters"] = [requests[i % len(requests)] for i in range(concurrent)]

    def timed(loras) -> float:
        t = time.perf_counter()
        outs = llm.chat(chats, params, lora_request=loras, use_tqdm=False)
        seconds = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return concurrent * max_tokens / seconds

    for loras in kinds.values():
        timed(loras)  # warm-up (reads every adapter once)
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for kind, loras in kinds.items():
            rates[kind].append(timed(loras))
    return {"system": system, "tok_s": {k: common.median(v) for k, v in rates.items()},
            "runs": rates}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", help="where the adapters are (made there if missing)")
    args = ap.parse_args()
    if args.smoke:
        args.concurrent, args.adapters, args.max_tokens, args.repeats = 4, 2, 8, 1
    if args.child:
        adapters = make_adapters(args.adapters, Path(args.dir))
        common.emit(child(args.child, args.concurrent, adapters, args.max_tokens,
                          args.repeats))
        return
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as where:
        make_adapters(args.adapters, Path(where))  # once, before any engine is timed
        flags = ["--concurrent", str(args.concurrent), "--adapters", str(args.adapters),
                 "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats),
                 "--dir", where]
        systems = ["lora-on"] if args.smoke else ["lora-on", "lora-off"]
        results = {s: common.run_child(__file__, s, flags) for s in systems}
    for system, res in results.items():
        if "error" in res:
            raise SystemExit(f"{system} failed:\n{res['error']}")
    on = results["lora-on"]["tok_s"]
    rows = [{"id": "L1", "measure": f"decode tok/s, {args.concurrent} concurrent requests over "
             f"{args.adapters} LoRA adapters ÷ the same requests on the base model (same "
             f"engine), {args.max_tokens} tokens each",
             "figure": f"{on['adapters']:.1f} vs {on['base']:.1f} tok/s",
             "ratio": f"{on['adapters'] / on['base']:.2f}", "target": "≥ 0.8"}]
    if "lora-off" in results:
        off = results["lora-off"]["tok_s"]["base"]
        rows.append({"id": "L1 base", "measure": "the same requests on the base model, engine with "
                     "LoRA on ÷ LoRA off", "figure": f"{on['base']:.1f} vs {off:.1f} tok/s",
                     "ratio": f"{on['base'] / off:.2f}", "target": "report"})
    payload = {"results": results, "rows": rows, "concurrent": args.concurrent,
               "adapters": args.adapters, "repeats": args.repeats}
    common.publish("lora", payload, args.smoke, "LoRA adapters vs base model",
                   {f"{s} {k}": (list(range(1, len(v) + 1)), v)
                    for s, res in results.items() for k, v in res["runs"].items()},
                   "repeat", "output tok/s")


if __name__ == "__main__":
    main()
