"""Engines with test-sized memory, and the config errors vLLM raises through our platform."""

from __future__ import annotations

import gc
import time


def make_llm(model: str, **kwargs):
    """An ``LLM`` with a small context and KV budget unless told otherwise."""
    from vllm import LLM

    kwargs.setdefault("max_model_len", 1024)
    kwargs.setdefault("kv_cache_memory_bytes", 128 << 20)
    return LLM(model=model, **kwargs)


def shutdown_llm(llm) -> None:
    """Stop the engine core (and its workers) now, not at interpreter exit."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def config_error(model: str, limit_s: float = 15, **kw) -> str:
    """The message vLLM's config build (with our platform hook) raises; within ``limit_s``.

    vLLM resolves the model's architecture (and the tokenizer) before our hook runs; on a
    loaded 2-core machine that alone has taken 10 s, so the bound leaves room for it.
    """
    from vllm.engine.arg_utils import EngineArgs

    start = time.perf_counter()
    try:
        EngineArgs(model=model, **kw).create_engine_config()
    except Exception as exc:  # what the user would see
        elapsed = time.perf_counter() - start
        assert elapsed < limit_s, f"the error took {elapsed:.1f} s"
        return str(exc)
    raise AssertionError(f"EngineArgs({kw}) was accepted")
