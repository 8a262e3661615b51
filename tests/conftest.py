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


@pytest.fixture(scope="session")
def prompts(model_dir) -> list[list[int]]:
    """The chat prompts as token ids (shared by the multi-rank equality tests)."""
    return chat_token_ids(model_dir, CHAT_PROMPTS)


@pytest.fixture(scope="session")
def tiny(model_dir, tmp_path_factory) -> str:
    """A random llama with 8 heads / 4 KV heads (TP 2 and 4 divide it)."""
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama-8h-4kv", model_dir)


def config_error(model: str, **kw) -> str:
    """The message vLLM's config build (with our platform hook) raises; it must come in < 10 s."""
    import time

    from vllm.engine.arg_utils import EngineArgs

    start = time.perf_counter()
    with pytest.raises(Exception) as info:
        EngineArgs(model=model, **kw).create_engine_config()
    assert time.perf_counter() - start < 10
    return str(info.value)


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


def tiny_llama(path, model_dir: str, heads: int = 8, kv_heads: int = 4, layers: int = 4,
               hidden: int = 256, seed: int = 0) -> str:
    """A random-weight llama in HF format (tokenizer borrowed from the default model)."""
    import shutil
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").is_file():
        return str(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=True, initializer_range=0.2, rope_theta=10000.0,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(str(path), safe_serialization=True)
    for f in Path(model_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja",):
            shutil.copy(f, path / f.name)
    return str(path)
