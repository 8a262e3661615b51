"""L1-L3: prefill and decode tok/s at long contexts (~1.5k, ~4k, ~7.5k tokens), 1 and 8
concurrent requests, side by side.

Systems (same model, fp32, same machine, same BLAS; one child process each):
  ours     - vLLM LLM + RayMetalExecutor (TP=1) on a private local Ray cluster
  mlx-lm   - raw mlx-lm: stream_generate for one stream, batch_generate for several
  vllm-cpu - vLLM's own CPU backend (torch), this package's plugin switched off

How it measures: prefill tok/s is prompt tokens over the time to generate one token from
fresh prompts; decode tok/s is new tokens over the time of a run on the same prompts
(their blocks now prefix-cached, so only the last partial block is recomputed) less the
time of a one-token run on the cached prompts. mlx-lm reports both rates itself.

    python benchmarks/bench_longctx.py                 # full run (long: prefill is slow here)
    python benchmarks/bench_longctx.py --lengths 1536 --levels 1,8
    python benchmarks/bench_longctx.py --lengths 7680 --levels 1 --name longctx-7680
    python benchmarks/bench_longctx.py --smoke         # a minute: short prompts, no vllm-cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTE = (
    "L rows: 1.5k and 4k tokens from the default name (2026-12-07, one repeat per point); "
    "~7.5k x 1 and x 8 from --name longctx-7680 and longctx-7680x8 (2026-12-07, one "
    "repeat). The 2026-12-02 run gave at 8 concurrent 1.32 (0.85) at 1.5k and 0.95 (0.76) "
    "at 4k: rates here move between days for every system (mlx-lm at 1.5k x 8: 30.0, then "
    "45.4 tok/s), so compare within a run. A second run of that point, ours and mlx-lm "
    "only, medians of 3 repeats (--systems ours,mlx-lm --lengths 1536 --levels 8 "
    "--repeats 3): decode 51.6 vs 52.1 tok/s (0.99), prefill 144.0 vs 121.2 (1.19). "
    "Where the step goes (benchmarks/profile_exp.py, the L why rows): MLX's exp on this "
    "CPU backend costs 17-31 ns an element, numpy's 0.56 on the same buffer, a multiply "
    "0.36. One layer's decode attention over 8 rows takes 4.1 ms at 1.5k positions, 8.6 at "
    "4k and 17.9 at 7.5k (x 30 layers: 124, 258 and 537 ms a step), its softmax alone 2.0 "
    "/ 3.7 / 9.8. mlx-lm's batch_generate runs the same MLX attention: at 1.5k x 8 its "
    "whole step is 154-176 ms (52.1 and 45.4 tok/s in the two runs), ~124 of them that "
    "attention by the layer timed alone, so 1.2x mlx-lm (a 128-147 ms step) would leave "
    "everything else in our step (the weights stream alone takes ~22 ms, then logits, "
    "sampling, vLLM's scheduler) 4-23 ms; at 7.5k x 8 ours leads (1.25). "
    "vllm-cpu's attention kernel does not pay MLX's exp: the same attention with numpy's "
    "softmax (a measuring stick, not in the package) takes 1.4 / 4.5 / 10.7 ms a layer, "
    "and vllm-cpu prefills 2.5-4x faster. Closing those gaps on "
    "this rig would be CPU-only tuning, which no issue asks for; on Metal the same MLX code "
    "runs on the GPU. Earlier profile (2026-12-02): a 1,536-token causal prefill costs 516 "
    "ms a layer as one square, 329 ms in 512-token pieces; at 8 rows x 1,536 positions one "
    "layer's attention took 6.9 ms over a contiguous cache and 12.2 ms when each context "
    "was first gathered from the paged pool (the design before the KV mirror).")


def corpus(tokenizer) -> list[int]:
    """The repository's own prose and code as one long token list (cycled as needed)."""
    if not callable(tokenizer):
        tokenizer = tokenizer._tokenizer
    texts = [p.read_text() for p in sorted((ROOT / "src").rglob("*.py"))]
    return tokenizer("\n\n".join([(ROOT / "README.md").read_text(), *texts]),
                     add_special_tokens=False)["input_ids"]


def prompts(ids: list[int], length: int, n: int, round_: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens; every (prompt, round) starts elsewhere, so no two
    share a first block (no prefix-cache hit between them)."""
    out = []
    for i in range(n):
        start = (round_ * 8 + i) * 211 % len(ids)
        out.append([ids[(start + j) % len(ids)] for j in range(length)])
    return out


def child_vllm(system: str, lengths: list[int], levels: list[int], new_tokens: int,
               repeats: int) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_ray_metal import default_model

    model = default_model()
    top = max(lengths) + new_tokens + 16
    kwargs = dict(model=model, max_model_len=min(8192, top), max_num_seqs=16, dtype="float32",
                  enable_prefix_caching=True, max_num_batched_tokens=max(2048, top))
    kwargs.update(common.engine_kwargs(system, 6 << 30))
    llm = LLM(**kwargs)
    ids = corpus(AutoTokenizer.from_pretrained(model))
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)

    def timed(batch, params) -> float:
        t = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - t

    warm = [TokensPrompt(prompt_token_ids=p) for p in prompts(ids, 64, 2, 99)]
    timed(warm, many)

    def measure(batch_ids: list[list[int]]) -> tuple[float, float]:
        batch = [TokensPrompt(prompt_token_ids=p) for p in batch_ids]
        c, length = len(batch), len(batch_ids[0])
        prefill = c * length / timed(batch, one)
        cached_one = timed(batch, one)
        return prefill, c * (new_tokens - 1) / (timed(batch, many) - cached_one)

    return {"system": system, **sweep(ids, lengths, levels, repeats, measure)}


def sweep(ids: list[int], lengths: list[int], levels: list[int], repeats: int,
          measure) -> dict:
    """Median prefill and decode tok/s of ``measure(prompts)`` at every length x level,
    fresh prompts each repeat."""
    prefill, decode, round_ = {}, {}, 0
    for length in lengths:
        for c in levels:
            rates = []
            for _ in range(repeats):
                round_ += 1
                rates.append(measure(prompts(ids, length, c, round_)))
            prefill[f"{length}x{c}"] = common.median([r[0] for r in rates])
            decode[f"{length}x{c}"] = common.median([r[1] for r in rates])
    return {"prefill": prefill, "decode": decode}


def child_mlx(lengths: list[int], levels: list[int], new_tokens: int, repeats: int) -> dict:
    from vllm_ray_metal import cpu, default_model

    cpu.preload()  # the same BLAS as our worker, loaded before MLX as it does
    cpu.setup_process()
    from mlx_lm import batch_generate, load, stream_generate

    model, tok = load(default_model())
    ids = corpus(tok)
    stream_generate(model, tok, prompts(ids, 64, 1, 99)[0], max_tokens=4)  # warm-up

    def measure(batch: list[list[int]]) -> tuple[float, float]:
        if len(batch) == 1:
            last = None
            for last in stream_generate(model, tok, batch[0], max_tokens=new_tokens):
                pass
            return last.prompt_tps, last.generation_tps
        stats = batch_generate(model, tok, batch, max_tokens=new_tokens).stats
        return stats.prompt_tps, stats.generation_tps

    return {"system": "mlx-lm", **sweep(ids, lengths, levels, repeats, measure)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--lengths", default="1536,4096,7680")
    ap.add_argument("--levels", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--systems", default="ours,mlx-lm,vllm-cpu")
    ap.add_argument("--name", default="longctx",
                    help="results file (a run of some points beside an earlier one)")
    args = ap.parse_args()
    if args.smoke:
        # 72 tokens: 4.5 blocks, so the cached rerun still recomputes a partial block
        # (12 new tokens: the decode time, a difference of two runs, well above the noise)
        args.lengths, args.levels, args.new_tokens, args.repeats = "72", "1,2", 12, 1
        args.systems = "ours,mlx-lm"
    lengths = [int(x) for x in args.lengths.split(",")]
    levels = [int(x) for x in args.levels.split(",")]
    if args.child:
        common.emit_each(args.child, lambda s: child_mlx(
            lengths, levels, args.new_tokens, args.repeats) if s == "mlx-lm" else child_vllm(
            s, lengths, levels, args.new_tokens, args.repeats))
        return

    child_args = ["--lengths", args.lengths, "--levels", args.levels,
                  "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    env = {"vllm-cpu": {"VLLM_RAY_METAL_DISABLE": "1", "VLLM_CPU_KVCACHE_SPACE": "6"}}
    systems = args.systems.split(",")
    # one process a system; a smoke runs mlx-lm, then ours, in one (mlx-lm first: its BLAS
    # is loaded before anything imports MLX, as in its own process): one Python start
    groups = [["mlx-lm", "ours"]] if args.smoke else [[s] for s in systems]
    results = {s: r for g in groups for s, r in common.run_together(
        __file__, g, child_args, env.get(g[0]), timeout=4 * 3600).items()}
    for s, r in results.items():
        if "error" in r:
            raise SystemExit(f"{s} failed:\n{r['error']}")
    rows = []
    ours, mlx = results["ours"], results["mlx-lm"]
    cpu = results.get("vllm-cpu")
    for key in ours["decode"]:
        length, c = key.split("x")
        for measure, ident in (("decode", "L-dec"), ("prefill", "L-pre")):
            o, m = ours[measure][key], mlx[measure][key]
            figure = f"{o:.1f} vs {m:.1f}"
            if cpu:
                figure += f" (vllm-cpu {cpu[measure][key]:.1f})"
            ratio = f"{o / m:.2f}" + (f" ({o / cpu[measure][key]:.2f})" if cpu else "")
            if measure == "decode":
                target = "≥ 1.0" if c == "1" else "≥ 1.2 (≥ 1.2)"
            else:
                target = "≥ 1.0"
            rows.append({"id": f"{ident} {length}x{c}",
                         "measure": f"{measure} tok/s, {length}-token prompts, {c} concurrent, "
                                    "ours ÷ mlx-lm (÷ vllm-cpu in brackets)",
                         "figure": figure + " tok/s", "ratio": ratio, "target": target})
    notes = [NOTE] if args.name == "longctx" and not args.smoke else []
    payload = {"results": results, "rows": rows, "new_tokens": args.new_tokens,
               "repeats": args.repeats, "notes": notes}
    series = {}
    for s, r in results.items():
        for c in levels:
            series[f"{s} decode, {c} concurrent"] = (lengths, [r["decode"][f"{n}x{c}"]
                                                               for n in lengths])
    common.publish(args.name, payload, args.smoke, "Decode tok/s against context length",
                   series, "prompt tokens", "decode tok/s")


if __name__ == "__main__":
    main()
