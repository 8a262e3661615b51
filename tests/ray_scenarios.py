"""Scenarios run in a fresh driver process against a test cluster; print one JSON line.

    python ray_scenarios.py <scenario> <ray address> <driver node ip> [backend] [json options]

options: {"model": dir, "prompts": [[token ids], ...], "max_tokens": n, "llm": {LLM kwargs}}

A fresh process per scenario is what users do (one driver per job) and keeps one
test's Ray connection and engine from leaking into the next.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback


@contextlib.contextmanager
def reporting(result: dict):
    """Run a scenario body; an exception becomes ``result["error"]`` (the test decides).

    Yields the start time; prints ``RESULT {json}`` however the body ends.
    """
    started = time.perf_counter()
    try:
        yield started
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["error_s"] = time.perf_counter() - started
        result["traceback"] = traceback.format_exc()[-3000:]
    print("RESULT " + json.dumps(result), flush=True)


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
    """Kill the last worker by pid while a long generation runs; then try a fresh LLM."""
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
    fresh = make_llm()  # the same cluster must serve a new LLM afterwards
    outs = fresh.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                      SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    result["text"] = outs[0].outputs[0].text
    result["workers"] = fresh.collective_rpc("node_info")
    fresh.llm_engine.engine_core.shutdown()


def main() -> None:
    scenario, address, node_ip = sys.argv[1:4]
    backend = sys.argv[4] if len(sys.argv) > 4 else "class"
    opts = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    import ray
    from vllm import LLM, SamplingParams

    from vllm_ray_metal import default_model

    ray.init(address=address, _node_ip_address=node_ip, logging_level="ERROR")
    result: dict = {"scenario": scenario}
    with reporting(result) as started:
        kwargs = dict(model=opts.get("model") or default_model(), max_model_len=512,
                      kv_cache_memory_bytes=64 << 20, **opts.get("llm", {}))
        chosen = backend_from(backend)
        if chosen is not None:
            kwargs["distributed_executor_backend"] = chosen
        llm = LLM(**kwargs)
        result["ready_s"] = time.perf_counter() - started
        if scenario == "kill":
            kill_mid_generation(llm, result, lambda: LLM(**kwargs))
            return
        if "prompts" in opts:
            from vllm.inputs import TokensPrompt

            params = SamplingParams(temperature=0.0, max_tokens=opts.get("max_tokens", 32),
                                    ignore_eos=True)
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in opts["prompts"]],
                                params, use_tqdm=False)
            result["outputs"] = [list(o.outputs[0].token_ids) for o in outs]
        else:
            outs = llm.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                            SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
            result["text"] = outs[0].outputs[0].text
            result["token_ids"] = list(outs[0].outputs[0].token_ids)
        result["workers"] = llm.collective_rpc("node_info")
        result["engine_core"] = type(llm.llm_engine.engine_core).__name__
        llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
