"""``vllm-ray-metal`` console script.

    vllm-ray-metal default-model        print (and create) the embedded model's directory
    vllm-ray-metal generate [PROMPT]    a real chat generation on the default model
"""

from __future__ import annotations

import argparse
import sys
import time


def _cmd_default_model(args: argparse.Namespace) -> int:
    from vllm_ray_metal.default_model import default_model

    print(default_model())
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from vllm import LLM, SamplingParams

    from vllm_ray_metal.default_model import default_model

    model = args.model or default_model()
    started = time.perf_counter()
    llm = LLM(model=model, max_model_len=args.max_model_len,
              kv_cache_memory_bytes=args.kv_cache_mib << 20)
    ready = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    started = time.perf_counter()
    out = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    elapsed = time.perf_counter() - started
    for prompt, result in zip(args.prompt, out):
        print(f"Q: {prompt}\nA: {result.outputs[0].text.strip()}\n")
    tokens = sum(len(r.outputs[0].token_ids) for r in out)
    print(f"[engine ready in {ready:.1f}s; {tokens} tokens in {elapsed:.1f}s]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-ray-metal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("default-model", help="print the embedded default model's directory")
    p.set_defaults(func=_cmd_default_model)

    p = sub.add_parser("generate", help="generate with vLLM on MLX")
    p.add_argument("prompt", nargs="*", default=["What is the capital of France?"])
    p.add_argument("--model", help="local HF-format model directory (default: embedded)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-mib", type=int, default=512)
    p.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
