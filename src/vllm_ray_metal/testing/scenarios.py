"""Driver scenarios, each in a fresh process against a test cluster; one JSON result each.

A fresh driver per scenario is what users do (one driver per job) and keeps one test's Ray
connection and engine from leaking into the next. :func:`run` starts one and returns what
it reported; the scenario prints ``RESULT {json}`` however it ends (an exception becomes
``result["error"]``, and the caller decides).

    python -m vllm_ray_metal.testing.scenarios gen|kill ADDRESS NODE_IP [BACKEND] [OPTIONS]
    python -m vllm_ray_metal.testing.scenarios dp ADDRESS NODE_IP OPTIONS

OPTIONS is JSON: {"model": dir, "prompts": [[token ids], ...], "max_tokens": n,
"llm": {LLM kwargs}}, or "jobs": [{"prompts", "max_tokens", "json_schemas", "loras"}, ...] run one
after the other on one engine (``dp``: "engine": {AsyncEngineArgs kwargs}). ``dp`` uses
``AsyncLLM`` (what ``vllm serve`` runs): vLLM 0.32's offline ``LLM`` refuses
data_parallel_size > 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass

MARK = "RESULT "


@dataclass
class Outcome:
    result: dict  # what the scenario reported
    output: str  # its stdout and stderr (vLLM logs to stdout)

    def ok(self) -> dict:
        """The result, asserting the scenario raised nothing."""
        assert "error" not in self.result, self.result.get("traceback", "") + self.output[-3000:]
        return self.result


def run_python(args: list[str], env: dict[str, str] | None = None, timeout: float = 600,
               clean: tuple[str, ...] = ("RAY_ADDRESS",)) -> Outcome:
    """Run ``python ARGS`` with this environment (minus ``clean``, plus ``env``); its
    last ``RESULT {json}`` line."""
    full = {k: v for k, v in os.environ.items() if k not in clean}
    full.update(env or {})
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                         timeout=timeout, env=full)
    output = out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(MARK)]
    assert lines, f"{args[:3]} printed no result:\n{output[-6000:]}"
    return Outcome(json.loads(lines[-1][len(MARK):]), output)


def run(scenario: str, cluster, backend: str = "class", opts: dict | None = None,
        env: dict[str, str] | None = None, timeout: float = 600, address: str | None = None,
        **kw) -> Outcome:
    """Run ``scenario`` (``gen``, ``kill`` or ``dp``) as a driver on ``cluster``'s head (or
    through ``address``, e.g. its ``ray://`` client address)."""
    args = ["-m", "vllm_ray_metal.testing.scenarios", scenario, address or cluster.address,
            cluster.head_ip]
    args += [json.dumps(opts or {})] if scenario == "dp" else [backend, json.dumps(opts or {})]
    return run_python(args, env, timeout, **kw)


def report(result: dict) -> None:
    print(MARK + json.dumps(result), flush=True)


@contextlib.contextmanager
def reporting(result: dict):
    """Run a scenario body; an exception becomes ``result["error"]``. Yields the start time."""
    started = time.perf_counter()
    try:
        yield started
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["error_s"] = time.perf_counter() - started
        result["traceback"] = traceback.format_exc()[-3000:]
    report(result)


def backend_from(name: str):
    if name == "class":
        from vllm_ray_metal import RayMetalExecutor

        return RayMetalExecutor
    if name == "stock":
        from vllm.v1.executor.ray_executor_v2 import RayExecutorV2

        return RayExecutorV2
    if name == "auto":
        return None
    return name  # "ray" or a qualname string


def kill_mid_generation(llm, result: dict, make_llm) -> None:
    """Kill the last worker by pid while a long generation runs; then (``make_llm`` not
    None) try a fresh LLM."""
    import os
    import signal
    import threading

    import psutil
    from vllm import SamplingParams

    result["engine_core"] = type(llm.llm_engine.engine_core).__name__
    victim = llm.collective_rpc("node_info")[-1]["pid"]
    killed_at: list[float] = []

    def kill() -> None:
        time.sleep(3)
        os.kill(victim, signal.SIGKILL)
        killed_at.append(time.perf_counter())

    threading.Thread(target=kill, daemon=True).start()
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    try:
        llm.generate(["Count to a thousand."] * 4, params, use_tqdm=False)
        result["fault"] = "no error"
    except Exception as exc:
        result["fault"] = f"{type(exc).__name__}: {exc}"
        result["time_to_error_s"] = time.perf_counter() - killed_at[0]
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    time.sleep(2)
    result["victim_gone"] = not psutil.pid_exists(victim) or \
        psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    if make_llm is None:
        return
    fresh = make_llm()  # the same cluster must serve a new LLM afterwards
    outs = fresh.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                      SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    result["text"] = outs[0].outputs[0].text
    result["workers"] = fresh.collective_rpc("node_info")
    fresh.llm_engine.engine_core.shutdown()


def generate_tokens(llm, job: dict) -> list[list[int]]:
    """Greedy tokens for ``job["prompts"]`` (``max_tokens``, ignoring EOS), each under its
    ``json_schemas`` entry when given (None: unconstrained) and on its ``loras`` entry
    ([name, id, path] of a LoRA adapter; None: the base model)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import StructuredOutputsParams

    n = job.get("max_tokens", 32)
    params: SamplingParams | list[SamplingParams] = SamplingParams(
        temperature=0.0, max_tokens=n, ignore_eos=True)
    if "json_schemas" in job:
        params = [SamplingParams(temperature=0.0, max_tokens=n, structured_outputs=(
            StructuredOutputsParams(json=s) if s else None)) for s in job["json_schemas"]]
    loras = [LoRARequest(*a) if a else None for a in job["loras"]] if "loras" in job else None
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params,
                        lora_request=loras, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def offline(scenario: str, address: str, node_ip: str, backend: str, opts: dict) -> None:
    """``gen``: one LLM, a chat (or ``opts["prompts"]``) and where its workers ran;
    ``kill``: :func:`kill_mid_generation`."""
    from vllm import LLM, SamplingParams

    from vllm_ray_metal import default_model
    from vllm_ray_metal.compat import ray as compat_ray

    if address.startswith("ray://"):  # Ray Client: the driver is not a node of the cluster
        import ray

        for attempt in range(3):
            try:
                ray.init(address, logging_level="ERROR")
                break
            except ConnectionAbortedError as exc:
                # Ray's client proxy starts one server process per client; under a loaded
                # suite that start has failed now and then ("Starting Ray client server
                # failed"), a Ray-side flake: a client would connect again, so do we
                if attempt == 2:
                    raise
                print(f"Ray Client connection refused ({str(exc)[:200]}); retrying",
                      flush=True)
                time.sleep(3)
    else:
        compat_ray.init(address, node_ip, logging_level="ERROR")
    result: dict = {"scenario": scenario}
    with reporting(result) as started:
        kwargs = {"model": opts.get("model") or default_model(), "max_model_len": 512,
                  "kv_cache_memory_bytes": 64 << 20, **opts.get("llm", {})}
        chosen = backend_from(backend)
        if chosen is not None:
            kwargs["distributed_executor_backend"] = chosen
        llm = LLM(**kwargs)
        result["ready_s"] = time.perf_counter() - started
        from vllm.platforms import current_platform

        result["key"] = current_platform.ray_device_key  # as the executor chose it here
        print(f"Ray resource key chosen: {result['key']}", flush=True)
        if scenario == "kill":
            kill_mid_generation(llm, result, None if opts.get("no_recovery") else
                                lambda: LLM(**kwargs))
            return
        if "embed" in opts:  # runner="pooling": one embedding per text
            outs = llm.embed(opts["embed"], use_tqdm=False)
            result["embeddings"] = [list(o.outputs.embedding) for o in outs]
        elif "jobs" in opts:  # several batches, one after the other, on the same engine
            result["jobs"] = [generate_tokens(llm, job) for job in opts["jobs"]]
        elif "prompts" in opts:
            result["outputs"] = generate_tokens(llm, opts)
            if "metrics" in opts:  # counters by name (needs "llm": {"disable_log_stats": False})
                result["metrics"] = {name: sum(m.value for m in llm.get_metrics()
                                               if m.name == name) for name in opts["metrics"]}
        else:
            outs = llm.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                            SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
            result["text"] = outs[0].outputs[0].text
            result["token_ids"] = list(outs[0].outputs[0].token_ids)
        result["workers"] = llm.collective_rpc("node_info")
        result["engine_core"] = type(llm.llm_engine.engine_core).__name__
        stopping = time.perf_counter()
        llm.llm_engine.engine_core.shutdown()
        result["shutdown_s"] = time.perf_counter() - stopping


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


async def run_data_parallel(opts: dict, result: dict) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_ray_metal import default_model
    from vllm_ray_metal.compat import vllm as compat_vllm

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
        result["replicas"] = await compat_vllm.dp_collective_rpc(engine, "node_info")
    finally:
        engine.shutdown()
        del engine  # (its __del__ would run again at interpreter exit, half torn down)


def data_parallel(address: str, node_ip: str, opts: dict) -> None:
    import vllm.v1.engine.async_llm  # noqa: F401  (imports are not part of error_s)

    from vllm_ray_metal.compat import ray as compat_ray

    compat_ray.init(address, node_ip, logging_level="ERROR")
    result: dict = {"scenario": "dp"}
    with reporting(result):
        asyncio.run(run_data_parallel(opts, result))


def main() -> None:
    scenario, address, node_ip, *rest = sys.argv[1:]
    if scenario == "dp":
        data_parallel(address, node_ip, json.loads(rest[0]))
    else:
        backend = rest[0] if rest else "class"
        offline(scenario, address, node_ip, backend, json.loads(rest[1]) if len(rest) > 1 else {})


if __name__ == "__main__":
    main()
