"""Shared fixtures. vLLM start-up is the slow part, so LLMs are shared per module."""

from __future__ import annotations

import gc
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test clusters live on loopback addresses only. Ray 2.60 turns on token auth for a head
# node once ~/.ray/auth_token exists (any local ray.init() may create it) while joining
# nodes default to off; pin one mode for every raylet and driver the tests start.
os.environ["RAY_AUTH_MODE"] = "disabled"

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain in one sentence what a CPU does.",
]


@pytest.fixture(scope="session")
def model_dir() -> str:
    from vllm_ray_metal import default_model

    return default_model()


def make_llm(model: str, **kwargs):
    """An LLM on the default model with test-sized memory (KV budget in MiB)."""
    from vllm import LLM

    kwargs.setdefault("max_model_len", 1024)
    kwargs.setdefault("kv_cache_memory_bytes", 128 << 20)
    return LLM(model=model, **kwargs)


def shutdown_llm(llm) -> None:
    """Stop the engine core (and its workers) now, not at interpreter exit."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def chat_token_ids(model: str, prompts: list[str]) -> list[list[int]]:
    """Chat-templated prompt token ids, computed with transformers' tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    out = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}],
                                       add_generation_prompt=True, tokenize=False)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out
