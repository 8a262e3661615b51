"""The branches a Mac takes, with MLX's Metal queries faked where MLX answers them.

MLX's own functions are replaced (``raising=True``): a wrong attribute name in our code
fails here instead of on the first Mac.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import mlx.core as mx
import pytest

from vllm_ray_metal import cpu
from vllm_ray_metal.engine import device

pytestmark = pytest.mark.unit
GIB = 1 << 30
M2_MAX = {"device_name": "Apple M2 Max", "architecture": "applegpu_g14s",
          "max_recommended_working_set_size": 22 * GIB, "memory_size": 32 * GIB}


@pytest.fixture
def mac(monkeypatch):
    """MLX as it answers on an M2 Max; default-device changes are recorded, not made."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True, raising=True)
    monkeypatch.setattr(mx, "device_info", lambda: dict(M2_MAX), raising=True)
    chosen = []
    monkeypatch.setattr(mx, "set_default_device", chosen.append, raising=True)
    monkeypatch.setattr(cpu, "LINUX", False)
    return chosen


def test_device_is_the_gpu_with_metals_working_set(mac):
    found = device.use()
    assert found == device.Device(True, "Apple M2 Max", 22 * GIB)
    assert mac == [mx.gpu]


def test_without_metal_the_cpu_and_available_ram(monkeypatch):
    import psutil

    chosen = []
    monkeypatch.setattr(mx.metal, "is_available", lambda: False, raising=True)
    monkeypatch.setattr(mx, "set_default_device", chosen.append, raising=True)
    found = device.use()
    assert not found.metal and found.name == "cpu" and chosen == [mx.cpu]
    assert abs(found.working_set - psutil.virtual_memory().available) < 2 * GIB


def test_platform_reports_the_mac(mac):
    from vllm.platforms import current_platform

    assert current_platform.get_device_name() == "Apple M2 Max"
    assert current_platform.get_device_total_memory() == 22 * GIB


def _worker(kv_bytes=None, fraction=0.5, max_model_len=4096):
    """A worker and runner with just what the KV budget reads (SmolLM2's KV shapes)."""
    from vllm_ray_metal.engine.model_runner import MLXModelRunner
    from vllm_ray_metal.engine.worker import MLXWorker

    runner = MLXModelRunner.__new__(MLXModelRunner)
    runner.weight_bytes, runner.block_size, runner.dtype = 3 * GIB, 16, mx.float32
    runner.lora, runner.draft, runner.draft_bytes = None, None, 0
    runner.model_config = SimpleNamespace(max_model_len=max_model_len)
    runner.kv_layout = lambda: (30, 3, 64)
    worker = MLXWorker.__new__(MLXWorker)
    worker.cache_config = SimpleNamespace(kv_cache_memory_bytes=kv_bytes,
                                          gpu_memory_utilization=fraction, block_size=16)
    worker.memory_at_start = device.query().working_set
    worker.model_runner = runner
    return worker


def test_kv_cache_gets_a_share_of_the_working_set(mac, monkeypatch):
    """The budget is the share of the working set less the weights; vLLM is told the
    pool's half of it, the mirror keeps the other half."""
    worker = _worker()
    assert worker.determine_available_memory() == (11 * GIB - 3 * GIB) // 2
    assert worker.model_runner.mirror_budget == (11 * GIB - 3 * GIB) // 2
    monkeypatch.setenv("VLLM_RAY_METAL_KV_MIRROR", "0")  # every byte to vLLM's blocks
    assert worker.determine_available_memory() == 8 * GIB
    assert worker.model_runner.mirror_budget == 0
    worker.model_runner.lora = SimpleNamespace(cache_bytes=GIB)  # adapters kept read
    assert worker.determine_available_memory() == 7 * GIB
    worker.cache_config.gpu_memory_utilization = 0.1  # 2.2 GiB < the weights
    with pytest.raises(ValueError, match="--gpu-memory-utilization.*--max-cpu-loras"):
        worker.determine_available_memory()


def test_a_draft_models_pool_takes_its_share_of_the_budget(mac, monkeypatch):
    """Speculation with a draft model: its weights count like the target's, and its pool
    (as many blocks, its own bytes per block) takes its share before vLLM is told."""
    monkeypatch.setenv("VLLM_RAY_METAL_KV_MIRROR", "0")
    worker = _worker()
    block = worker.get_cache_block_size_bytes()
    worker.model_runner.draft = SimpleNamespace(bytes_per_block=lambda: block // 2)
    worker.model_runner.draft_bytes = 1 * GIB
    assert worker.determine_available_memory() == (11 * GIB - 4 * GIB) * 2 // 3


def test_the_mirror_never_takes_what_one_max_length_request_needs(mac):
    block = 16 * 2 * 30 * 3 * 64 * 4
    worker = _worker(kv_bytes=300 * block, max_model_len=4096)
    assert worker.get_cache_block_size_bytes() == block
    # 4096 tokens need 256 blocks (+ vLLM's null block): the pool keeps 257 of 300
    assert worker.determine_available_memory() == 257 * block
    assert worker.model_runner.mirror_budget == 43 * block


def test_worker_on_a_mac_installs_no_cpu_tuning(mac, monkeypatch):
    """init_device: the GPU, no BLAS/heap set-up; the model keeps mlx-lm's modules."""
    from vllm_ray_metal.engine import tensor_parallel, worker as worker_module
    from vllm_ray_metal.testing.models import mlx_llama

    monkeypatch.setattr(worker_module, "MLXModelRunner", lambda config, group: "runner")
    monkeypatch.setattr(tensor_parallel, "init_group", lambda rank, world, hosts: None)
    called = []
    monkeypatch.setattr(cpu, "setup_process", lambda *a: called.append(a) or "tuned")
    w = worker_module.MLXWorker.__new__(worker_module.MLXWorker)
    w.model_config = SimpleNamespace(seed=0)
    w.parallel_config = SimpleNamespace(world_size=1)
    w.vllm_config, w.rank = None, 0
    w.init_device()
    assert mac == [mx.gpu] and called == [] and w.cpu_setup == ""
    assert w.memory_at_start == 22 * GIB
    assert cpu.tuning() == "0" and cpu.preload() is None
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert cpu.install(mlx_llama(), mx.float32) == {}


def test_node_units_name_the_metal_gpu(mac):
    from vllm_ray_metal.cli import node

    assert node.detect_units() == (1, "Metal GPU (Apple M2 Max)")


def test_macos_multi_node_ray_is_allowed_where_we_start_ray(mac, monkeypatch, tmp_path):
    """`vllm-ray-metal start` and the executor's own connect set Ray's macOS switch."""
    from vllm_ray_metal.cli import node
    from vllm_ray_metal.compat import ray as compat_ray
    from vllm_ray_metal.distributed import cluster

    monkeypatch.setattr(compat_ray, "MACOS", True)
    monkeypatch.setenv("VLLM_RAY_METAL_CACHE", str(tmp_path))
    seen = {}

    class Started(Exception):
        pass

    def popen(cmd, env=None, **kw):
        seen["env"] = env
        raise Started

    monkeypatch.setattr(node.subprocess, "Popen", popen)
    with pytest.raises(Started):
        node.start_node(head=True, address=None, node_ip="127.0.0.9", port=6379, key="METAL",
                        units=None, extra=[])
    assert seen["env"][compat_ray.OSX_CLUSTER_ENV] == "1"

    monkeypatch.setenv(compat_ray.OSX_CLUSTER_ENV, "")  # (so teardown removes what we set)
    monkeypatch.delenv(compat_ray.OSX_CLUSTER_ENV)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(compat_ray, "init", lambda *a, **kw: None)
    cluster.connect("METAL")
    assert os.environ[compat_ray.OSX_CLUSTER_ENV] == "1"
