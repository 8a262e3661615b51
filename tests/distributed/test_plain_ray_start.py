"""Macs as they come: plain `ray start` on each machine, then vLLM as a vLLM user runs it.

On Apple Silicon, plain ``ray start`` advertises ``GPU: 1`` (Ray's Apple GPU detection);
here ``--num-gpus 1`` stands in for it. No ``VLLM_RAY_METAL_*`` variable, no custom
resource, no ``VLLM_HOST_IP``: the executor must find the key (``auto``) by itself.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vllm_ray_metal.testing import scenarios
from vllm_ray_metal.testing.cluster import LocalRayCluster
from vllm_ray_metal.testing.models import hf_greedy
from vllm_ray_metal.testing.serve import post

pytestmark = pytest.mark.ray
OURS = tuple(k for k in os.environ if k.startswith("VLLM_RAY_METAL_")) + (
    "RAY_ADDRESS", "VLLM_HOST_IP")
NEW_TOKENS = 12


def plain(cluster, opts: dict, **kw) -> dict:
    """The seed's driver: `LLM(model=..., distributed_executor_backend="ray")`."""
    out = scenarios.run("gen", cluster, "ray", opts, clean=OURS, **kw)
    res = out.ok()
    print(f"chosen key: {res['key']}")
    assert res["key"] == "GPU"
    return res


@pytest.fixture(scope="module")
def two_macs():
    with LocalRayCluster([("127.0.0.86", {"GPU": 1}), ("127.0.0.87", {"GPU": 1})],
                         stock_head=True) as c:
        yield c


def test_one_mac_llm_with_ray_backend(model_dir):
    with LocalRayCluster([("127.0.0.85", {"GPU": 1})]) as c:
        res = plain(c, {"model": model_dir})
    assert "Paris" in res["text"]
    assert res["workers"][0]["host_ip"] == "127.0.0.85"


def test_two_macs_pipeline_parallel_on_a_hub_id_from_the_local_cache(two_macs, model_dir,
                                                                     prompts, hf_reference,
                                                                     tmp_path):
    """One pipeline stage on each Mac, the model named by a hub id (`org/name`) that each
    node resolves from a Hugging Face cache, offline."""
    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--smol-org--SmolLM2-135M-Instruct"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    for f in Path(model_dir).iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}  # workers get the driver's env
    res = plain(two_macs, {"model": "smol-org/SmolLM2-135M-Instruct", "prompts": prompts[:2],
                           "max_tokens": NEW_TOKENS, "llm": {"pipeline_parallel_size": 2}},
                env=env)
    shutil.rmtree(hf_home)
    assert res["outputs"] == [hf_greedy(hf_reference, p, NEW_TOKENS) for p in prompts[:2]]
    assert {w["host_ip"] for w in res["workers"]} == {"127.0.0.86", "127.0.0.87"}


def test_two_macs_through_ray_client(two_macs, model_dir):
    """The seed's `ray.init(address="ray://HEAD:10001")`: the driver is a Ray Client."""
    res = plain(two_macs, {"model": model_dir}, address=two_macs.client_address)
    assert "Paris" in res["text"]


def test_vllm_serve_with_ray_backend(two_macs, model_dir, tmp_path):
    """`vllm serve MODEL --distributed-executor-backend ray` against the plain cluster,
    one pipeline stage on each Mac (one worker alone: test_one_mac_llm_with_ray_backend)."""
    pp = 2
    from vllm_ray_metal.testing.serve import ServeProcess

    log = tmp_path / "serve.log"
    with ServeProcess(two_macs, model_dir, log, "--max-model-len", "512",
                      "--kv-cache-memory-bytes", str(64 << 20),
                      "--pipeline-parallel-size", str(pp), backend="ray",
                      clean=OURS) as srv:
        srv.wait_healthy()
        res = post(srv.base + "/v1/chat/completions", {
            "model": "smollm2", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert "Paris" in res["choices"][0]["message"]["content"]
    text = log.read_text()
    assert "MLX workers use the Ray resource 'GPU'" in text
    assert f"RayMetalExecutor: {pp} MLX worker(s) on" in text
