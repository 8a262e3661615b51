"""Data-parallel scenario in a fresh driver process; prints one ``RESULT {json}`` line.

    python dp_scenario.py <ray address> <driver node ip> <json options>

options: {"model": dir, "prompts": [[token ids], ...], "max_tokens": n,
          "engine": {AsyncEngineArgs kwargs, e.g. data_parallel_size, tensor_parallel_size}}

Offline ``LLM`` refuses data_parallel_size > 1 in vLLM 0.32, so this uses ``AsyncLLM``
(what ``vllm serve`` runs). Which replica served each request comes from a stat logger
(public API: per-engine ``record(..., engine_idx)`` with finished request ids); where each
replica's workers run comes from ``node_info`` on every replica.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import defaultdict

from ray_scenarios import reporting


def recorder(served: dict, tokens: dict):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class Recorder(StatLoggerBase):
        """Counts generated tokens and finished requests per DP engine index."""

        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                   engine_idx: int = 0) -> None:
            if iteration_stats is None:
                return
            tokens[engine_idx] += iteration_stats.num_generation_tokens
            for finished in iteration_stats.finished_requests:
                served[finished.request_id] = engine_idx

        def log_engine_initialized(self) -> None:
            pass

    return Recorder


async def run(opts: dict, result: dict) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_ray_metal import compat, default_model

    served: dict[str, int] = {}
    tokens: dict[int, int] = defaultdict(int)
    started = time.perf_counter()
    kwargs = dict(model=opts.get("model") or default_model(), max_model_len=512,
                  kv_cache_memory_bytes=64 << 20, data_parallel_backend="ray",
                  distributed_executor_backend="ray")
    kwargs.update(opts.get("engine", {}))
    args = AsyncEngineArgs(**kwargs)
    engine = AsyncLLM.from_engine_args(args, stat_loggers=[recorder(served, tokens)])
    try:
        result["ready_s"] = time.perf_counter() - started
        params = SamplingParams(temperature=0.0, max_tokens=opts.get("max_tokens", 16),
                                ignore_eos=True)

        async def one(i: int, ids: list[int]) -> list[int]:
            final = None
            async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), params,
                                             request_id=f"req-{i}"):
                final = out
            return list(final.outputs[0].token_ids)

        t0 = time.perf_counter()
        result["outputs"] = await asyncio.gather(
            *[one(i, p) for i, p in enumerate(opts["prompts"])])
        result["generate_s"] = time.perf_counter() - t0
        result["tokens_per_s"] = sum(map(len, result["outputs"])) / result["generate_s"]
        deadline = time.monotonic() + 30  # stat records arrive with later output batches
        while len(served) < len(opts["prompts"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        result["served_by"] = {rid: idx for rid, idx in sorted(served.items())}
        result["tokens_by_engine"] = {str(k): v for k, v in sorted(tokens.items())}
        result["replicas"] = await compat.dp_collective_rpc(engine, "node_info")
    finally:
        engine.shutdown()
        del engine  # (its __del__ would run again at interpreter exit, half torn down)


def main() -> None:
    address, node_ip, raw = sys.argv[1:4]
    import ray

    import vllm.v1.engine.async_llm  # noqa: F401  (imports are not part of error_s)

    ray.init(address=address, _node_ip_address=node_ip, logging_level="ERROR")
    result: dict = {}
    with reporting(result):
        asyncio.run(run(json.loads(raw), result))


if __name__ == "__main__":
    main()
