"""P3: decode throughput with tensor parallelism, TP=2 ÷ TP=1, on a ~1B random-weight llama.

Decode throughput is the tokens after each request's first one over the time they add: a
run with ``max_tokens=1`` (prefill and first token) is subtracted from a full run. The
end-to-end rate (prefill included) is recorded next to it.

Each rank runs on its own raylet (distinct loopback addresses stand in for two Macs) with
one BLAS thread (``VLLM_RAY_METAL_BLAS_THREADS=1``), so TP=1 is one core and TP=2 is two:
the ratio shows what splitting the weights and the MLX ring all-reduces buy. Every batch
size in ``--prompts`` runs on the same ``LLM``: a few rows stream the weights, many rows
are bound by arithmetic, and TP halves the two differently. Over the timed runs each
rank's CPU is split by thread (compute stream, Python, the rest), to show where TP=2's
two cores go.

    python benchmarks/bench_tp.py            # full run: ~1.1B params, fp32 (~4.4 GB)
    python benchmarks/bench_tp.py --smoke    # seconds: a tiny llama, few tokens
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# ~1.1B parameters (TinyLlama-like shape, SmolLM2's 49152-token vocabulary and tokenizer)
FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4)
SMOKE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4)
NODES = ["127.0.0.92", "127.0.0.93"]
NOTE = ("P3 at two batch sizes (two runs on 2026-11-30, 16 new tokens, 3 repeats; the table "
        "holds the second; the sizes share one LLM per TP size, and each rank's CPU is split "
        "by thread with psutil over the timed runs): TP=2 ÷ TP=1 was 1.51 / 1.37 at 4 prompts "
        "and 1.74 / 1.54 at 16. TP=2's rates were steady (20.2 / 20.5 and 38.1 / 38.5 tok/s), "
        "TP=1's were not (13.4 / 14.9 and 21.9 / 25.0). At 4 prompts a step streams the "
        "weights (TP=1: 373 / 352 ms of CPU a step in MLX's compute thread); at 16 it is "
        "bound by arithmetic (1025 / 934 ms, 2.7x the work for 4x the rows), which TP halves "
        "(491 / 487 ms on each TP=2 rank), while the weight stream does not halve when both "
        "ranks share one memory bus (201 / 197 ms a rank at 4 prompts against 187 / 176 for "
        "half of TP=1). Each TP=2 rank also spends 20-26 ms a step (58-67 at 16 prompts) in "
        "threads other than its compute and main threads, against 0-3 ms on TP=1: MLX's "
        "ring sockets, whose threads retry a pending send or receive in a loop (see "
        "profile_tp's note); on two cores those cycles come out of the ranks' compute. Made "
        "blocking (scratch code: the ring's two sockets without O_NONBLOCK, a 1 ms receive and "
        "send timeout) those threads took 7-9 ms a step, but TP=2 decoded slower (20.1-21.7 "
        "against 21.8-22.4 tok/s, three alternating pairs): a receiver woken from sleep costs "
        "the ranks more than one that spins. The engine core used 5-30 ms of CPU a step "
        "and the ranks' main threads (vLLM's worker loop, the graph build) 13-29. "
        "P3: both ranks share one machine's memory bandwidth and 2 cores (with the engine, Ray "
        "and the raylets), and each step does 44 MLX ring all-reduces and one all-gather over "
        "loopback TCP; on two Macs each rank has its own memory bus (not measured). TP=2 "
        "decodes the same tokens as TP=1. Each rank holds 2.34 GB of the 4.28 GB (mlx-lm's "
        "shard keeps the embedding whole), but projects onto only its half of the vocabulary "
        "(403 MB -> 201 MB read a step); with that and the per-step rope tables the ratio went "
        "from 1.32 (end to end, 2026-11-27 morning) to the figure above. Prefix caching is on "
        "(vLLM's default), so after the warm-up the prompts are cached in every timed run: "
        "the end-to-end figure holds little prefill. SwiGLU's activation runs in numpy on both "
        "sides (swiglu.py; 4 rows x 5632 or 2816 gate elements); with it the decode ratio was "
        "1.66 in the 2026-11-27 afternoon run (per-repeat 1.56-1.76), 1.53 in the morning "
        "without it, with every rate ~20% lower in the afternoon (the machine, all systems). "
        "With the compiled norms and decode rope (fewer MLX primitives a step on each rank) "
        "the evening run gave 1.63, from per-repeat TP=2 rates of 11.2 and 7.6 tok/s against "
        "TP=1's 5.9 and 5.6: one repeat alone would have said 1.89 or 1.36. On 2026-11-30 "
        "(OpenBLAS behind the cblas shim instead of MKL, q/k/v and gate/up fused on both "
        "sides: TP's column shards fuse like plain linears) per-repeat rates were TP=2 8.27 "
        "and 8.47, TP=1 4.13 and 5.29 tok/s, same tokens. Later on 2026-11-30 the shim's own "
        "few-row kernel (sgemm_shim.c) replaced OpenBLAS's sgemm for these 4-row products: "
        "TP=1 went 4.71 -> 15.4 tok/s and TP=2 8.37 -> 23.9, so the ratio fell from 1.78 to "
        "~1.55. OpenBLAS's one-thread sgemm had been bound by packing, which TP halves; the "
        "kernel streams the weights near one core's bandwidth (one 4-row reader: 17.5 GB/s; "
        "two processes at once: 17.5 GB/s each). Instrumented steps (4 rows): TP=1 272 ms "
        "(forward 244, reading ~3.9 GB at ~16 GB/s; logits 23), each TP=2 rank 183 ms "
        "(forward 165, ~1.9 GB at ~12 GB/s; logits and all-gather 14). So TP=2's ranks lose "
        "~55 ms a step to what TP adds, against ~23 ms of non-streaming work on TP=1: 44 MLX "
        "ring all-reduces over loopback TCP, each also waiting for the slower rank, on two "
        "cores that also run the engine and Ray; benchmarks/profile_tp.py has since split "
        "the step and timed the all-reduces one by one (its note). On two Macs each rank "
        "has its own cores and memory bus, and the all-reduces cross a real link instead "
        "(not measured).")

def build_model(path: Path, shape: dict, tokenizer_dir: str) -> str:
    """A random-weight llama in HF format, written directly as safetensors (no torch)."""
    if (path / "config.json").is_file():
        return str(path)
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152,
               max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=True, torch_dtype="float32", bos_token_id=1,
               eos_token_id=2, hidden_act="silu", **shape)
    h, inter, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"]
    head = h // shape["num_attention_heads"]
    rng = np.random.default_rng(0)

    def w(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims, dtype=np.float32) * 0.02)

    tensors = {"model.embed_tokens.weight": w(49152, h),
               "model.norm.weight": np.ones(h, np.float32)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv * head, h),
            p + "self_attn.v_proj.weight": w(kv * head, h), p + "self_attn.o_proj.weight": w(h, h),
            p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32)})
    save_file(tensors, str(path / "model.safetensors"))
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json",):
            shutil.copy(f, path / f.name)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return str(path)


def thread_cpu(pids: list[int]) -> dict[int, dict[int, float]]:
    """CPU seconds so far of each thread of each process (psutil; {} where unreadable)."""
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}
        except (psutil.Error, OSError):
            out[pid] = {}
    return out


def cpu_split(used: dict[int, dict[int, float]], steps: int) -> list[dict]:
    """Each rank's CPU ms a step from its threads' CPU seconds: the busiest thread (MLX's
    compute stream), the main thread (Python: vLLM's worker loop and the graph build; known
    where a thread id is the pid, as on Linux) and the rest (MLX's ring sockets, Ray)."""
    ranks = []
    for pid, threads in used.items():
        if not threads:
            continue
        busiest = max(threads, key=threads.get)
        main = threads.get(pid, 0.0) if pid != busiest else 0.0
        rest = sum(threads.values()) - threads[busiest] - main
        ranks.append({"pid": pid, "compute_ms": 1e3 * threads[busiest] / steps,
                      "main_ms": 1e3 * main / steps, "other_ms": 1e3 * rest / steps})
    return ranks


def child(tp: int, address: str, model: str, sizes: list[int], new_tokens: int,
          repeats: int) -> dict:
    """Driver on the cluster: LLM with TP ranks, timed greedy decoding of each batch size."""
    import psutil
    import ray
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_ray_metal import RayMetalExecutor

    if not ray.is_initialized():  # (a smoke runs both TP sizes in one process)
        ray.init(address=address, logging_level="ERROR")
    llm = LLM(model=model, tensor_parallel_size=tp, distributed_executor_backend=RayMetalExecutor,
              max_model_len=512, kv_cache_memory_bytes=256 << 20, dtype="float32")
    info = llm.collective_rpc("node_info")
    pids = [i["pid"] for i in info]  # the ranks run on this machine's loopback raylets
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    prefill = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    engine = psutil.Process()  # the engine core runs in this process (config.py)
    by_size = {}
    for prompts in sizes:
        batch = [TokensPrompt(prompt_token_ids=list(range(100 + 7 * i, 132 + 7 * i)))
                 for i in range(prompts)]

        def timed(p: SamplingParams) -> tuple[float, list]:
            t = time.perf_counter()
            outs = llm.generate(batch, p, use_tqdm=False)
            return time.perf_counter() - t, outs

        timed(params)  # warm-up
        rates, decode_rates, first = [], [], None
        wall = engine_cpu = 0.0
        used: dict[int, dict[int, float]] = {}  # thread CPU seconds over the full runs
        for _ in range(repeats):
            t_prefill, _ = timed(prefill)  # the prompts and their first token
            before, cpu0 = thread_cpu(pids), engine.cpu_times()
            t_all, outs = timed(params)
            after, cpu1 = thread_cpu(pids), engine.cpu_times()
            wall += t_all
            engine_cpu += cpu1.user + cpu1.system - cpu0.user - cpu0.system
            for pid, threads in after.items():
                mine = used.setdefault(pid, {})
                for tid, cpu in threads.items():
                    mine[tid] = mine.get(tid, 0.0) + cpu - before[pid].get(tid, 0.0)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rates.append(tokens / t_all)
            # decode only: the tokens after the first, over the time they added
            decode_rates.append((tokens - len(batch)) / max(t_all - t_prefill, 1e-9))
            first = first or [list(o.outputs[0].token_ids) for o in outs]
        steps = repeats * new_tokens  # engine steps of the full runs
        by_size[str(prompts)] = {
            "tok_s": common.median(decode_rates), "runs": decode_rates,
            "end_to_end_tok_s": common.median(rates), "end_to_end_runs": rates,
            "tokens": first, "wall_ms_per_step": 1e3 * wall / steps,
            "engine_cpu_ms_per_step": 1e3 * engine_cpu / steps,
            "rank_cpu": cpu_split(used, steps)}
    llm.llm_engine.engine_core.shutdown()  # free the ranks' units for the next LLM
    return {"system": f"tp{tp}", "by_prompts": by_size,
            "ranks": [{k: i[k] for k in ("host_ip", "weight_bytes")} for i in info]}


def run(tps: tuple[int, ...], model: str, args) -> dict:
    """TP sizes ``tps``, one after the other in one child process on one private cluster
    of ``max(tps)`` raylets: ``{"tp<n>": result}``."""
    from vllm_ray_metal.testing.cluster import LocalRayCluster

    # a private loopback cluster: no token auth (Ray 2.60 turns it on for a head node
    # once ~/.ray/auth_token exists), for the raylets and the driver alike
    env = {"VLLM_RAY_METAL_BLAS_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    with LocalRayCluster([(ip, {"METAL": 1}) for ip in NODES[:max(tps)]], env=env).start(
            timeout=240) as c:
        return common.run_together(__file__, [f"tp{tp}" for tp in tps], [
            "--address", c.address, "--model", model, "--prompts", args.prompts,
            "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)],
            env=env)


def rows_for(sizes: list[int], one: dict, two: dict, name: str) -> list[dict]:
    """A P3 row for each batch size, then where TP=2's CPU went at the first size."""
    rows = []
    for n in sizes:
        a, b = one["by_prompts"][str(n)], two["by_prompts"][str(n)]
        rows.append({
            "id": "P3", "measure": f"decode tok/s (after the first token), TP=2 (two raylets, "
            f"1 BLAS thread each) ÷ TP=1 (1 thread); {name}, {n} prompts; end to end "
            "(prefill included) in brackets",
            "figure": f"{b['tok_s']:.2f} vs {a['tok_s']:.2f} tok/s "
                      f"({b['end_to_end_tok_s']:.2f} vs {a['end_to_end_tok_s']:.2f})",
            "ratio": f"{b['tok_s'] / a['tok_s']:.2f} "
                     f"({b['end_to_end_tok_s'] / a['end_to_end_tok_s']:.2f})",
            "target": "≥ 1.6"})
    a, b = one["by_prompts"][str(sizes[0])], two["by_prompts"][str(sizes[0])]

    def split(res: dict) -> str:
        return "; ".join(f"{r['compute_ms']:.0f} / {r['main_ms']:.0f} / {r['other_ms']:.0f}"
                         for r in res["rank_cpu"])
    rows.append({
        "id": "P3 why", "measure": f"CPU ms a step of each rank's threads during the timed "
        f"runs ({sizes[0]} prompts): busiest (MLX's compute stream) / main (Python) / the rest "
        "(MLX's ring sockets, Ray); the engine's; wall ms a step",
        "figure": f"TP=1 {split(a)}; TP=2 {split(b)}",
        "ratio": f"engine {a['engine_cpu_ms_per_step']:.0f} / "
                 f"{b['engine_cpu_ms_per_step']:.0f}; wall {a['wall_ms_per_step']:.0f} / "
                 f"{b['wall_ms_per_step']:.0f}", "target": "—"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--address")
    ap.add_argument("--model")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--prompts", default="4,16", help="batch sizes, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.smoke:
        args.prompts, args.new_tokens, args.repeats = "2,3", 4, 1
    sizes = [int(n) for n in args.prompts.split(",")]
    if args.child:
        common.emit_each(args.child, lambda name: child(
            int(name[2:]), args.address, args.model, sizes, args.new_tokens, args.repeats))
        return
    from vllm_ray_metal import default_model
    from vllm_ray_metal.default_model import cache_root

    name = "bench-llama-tiny" if args.smoke else "bench-llama-1.1b"
    model = build_model(cache_root() / name, SMOKE if args.smoke else FULL, default_model())
    results = {}
    # A full run measures each TP size on its own cluster (TP=1 without an idle second
    # raylet); a smoke runs the same child code for both in one process on one two-raylet
    # cluster: one cluster start and one vLLM import instead of two.
    for tps in [(1, 2)] if args.smoke else [(1,), (2,)]:
        for name, res in run(tps, model, args).items():
            if "error" in res:
                raise SystemExit(f"{name} failed:\n{res['error']}")
            results[name] = res
    one, two = results["tp1"], results["tp2"]
    same = all(one["by_prompts"][str(n)]["tokens"] == two["by_prompts"][str(n)]["tokens"]
               for n in sizes)
    payload = {"results": results, "rows": rows_for(sizes, one, two, Path(model).name),
               "same_tokens": same, "model": dict(SMOKE if args.smoke else FULL),
               "notes": [NOTE]}
    common.publish("tp_scaling", payload, args.smoke, "Decode throughput, TP=1 and TP=2",
                   {f"TP={tp}": (sizes, [results[f"tp{tp}"]["by_prompts"][str(n)]["tok_s"]
                                         for n in sizes]) for tp in (1, 2)},
                   "prompts decoded together", "decode tok/s")


if __name__ == "__main__":
    main()
