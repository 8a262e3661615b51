"""`vllm serve` with RayMetalExecutor answers the OpenAI endpoints (live cluster, HTTP)."""

from __future__ import annotations

import pytest

from vllm_ray_metal.testing.serve import post

pytestmark = pytest.mark.serve


def test_completions(server):
    base = server.base
    res = post(base + "/v1/completions", {"model": "smollm2", "prompt": "The capital of France is",
                                          "max_tokens": 8, "temperature": 0})
    assert "Paris" in res["choices"][0]["text"]
    assert res["usage"]["completion_tokens"] > 0
    # the shared server's worker node (conftest.py)
    assert "RayMetalExecutor: 1 MLX worker(s) on 127.0.0.53" in server.log.read_text()


def test_chat_completions(server):
    base = server.base
    res = post(base + "/v1/chat/completions", {
        "model": "smollm2", "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert "Paris" in res["choices"][0]["message"]["content"]
