"""`vllm serve` with RayMetalExecutor answers the OpenAI endpoints (live cluster, HTTP)."""

from __future__ import annotations

import pytest

from ray_cluster import LocalRayCluster
from serve_helpers import ServeProcess, post


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with LocalRayCluster([("127.0.0.22", {}), ("127.0.0.23", {"METAL": 1})]) as c:
        with ServeProcess(c, model_dir, log, "--max-model-len", "512",
                          "--kv-cache-memory-bytes", str(64 << 20)) as srv:
            srv.wait_healthy()
            yield srv.base, log


def test_completions(server):
    base, log = server
    res = post(base + "/v1/completions", {"model": "smollm2", "prompt": "The capital of France is",
                                          "max_tokens": 8, "temperature": 0})
    assert "Paris" in res["choices"][0]["text"]
    assert res["usage"]["completion_tokens"] > 0
    assert "RayMetalExecutor: 1 MLX worker(s) on 127.0.0.23" in log.read_text()


def test_chat_completions(server):
    base, _ = server
    res = post(base + "/v1/chat/completions", {
        "model": "smollm2", "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert "Paris" in res["choices"][0]["message"]["content"]
