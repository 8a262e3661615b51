"""Shared fixtures, and the rule that every test says what it needs (a marker).

vLLM start-up is the slow part, so engines and clusters are shared per module. Helpers
live in ``vllm_ray_metal.testing`` (also used by the benchmarks), not in test files.
"""

from __future__ import annotations

import os

import pytest

from vllm_ray_metal.testing.models import CHAT_PROMPTS, chat_token_ids, tiny_llama

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test clusters live on loopback addresses only. Ray 2.60 turns on token auth for a head
# node once ~/.ray/auth_token exists (any local ray.init() may create it) while joining
# nodes default to off; pin one mode for every raylet and driver the tests start.
os.environ["RAY_AUTH_MODE"] = "disabled"

KINDS = ("unit", "engine", "ray", "serve", "bench")  # what a test starts; exactly one each


def pytest_collection_modifyitems(config, items) -> None:
    unmarked = [item.nodeid for item in items
                if sum(item.get_closest_marker(k) is not None for k in KINDS) != 1]
    if unmarked:
        raise pytest.UsageError(f"each test needs exactly one of the markers {KINDS}: "
                                + ", ".join(unmarked))


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
    """A random llama in HF format with 8 heads / 4 KV heads (TP 2 and 4 divide it)."""
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama-8h-4kv", model_dir)


@pytest.fixture(scope="session")
def tiny_5_layers(model_dir, tmp_path_factory) -> str:
    """The same llama with 5 layers: vLLM splits them unevenly ([3, 2] over two stages)."""
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama-5l", model_dir, layers=5)


@pytest.fixture(scope="session")
def hf_reference(model_dir):
    """transformers on the default model's weights: the independent reference."""
    from vllm_ray_metal.testing.models import hf_model

    return hf_model(model_dir)
