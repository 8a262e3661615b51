"""`vllm-ray-metal start/status/stop` on a loopback address; stop ends exactly its node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from vllm_ray_metal.compat import ray as compat_ray
from vllm_ray_metal.testing.cluster import free_port

CLI = [sys.executable, "-m", "vllm_ray_metal.cli"]


PRELOAD_PROBE = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
f = ray.remote(num_cpus=0)(lambda: "vllm_ray_metal.engine.worker" in sys.modules)
print(ray.get(f.remote()))
"""


WARM_PROBE = """
import sys, ray
from vllm import LLM
from vllm_ray_metal import RayMetalExecutor, default_model
ray.init(address=sys.argv[1], logging_level="ERROR")
llm = LLM(model=default_model(), max_model_len=128, kv_cache_memory_bytes=1 << 26,
          distributed_executor_backend=RayMetalExecutor)
executor = llm.llm_engine.engine_core.engine_core.model_executor
print("WARM", sum(executor.preload_used.values()), executor.worker_pids[0])
llm.llm_engine.engine_core.shutdown()
"""


def warm_probe(port: int, env: dict) -> tuple[int, int]:
    """(workers the LLM's executor used on --preload nodes, its rank-0 worker pid)."""
    out = subprocess.run([sys.executable, "-c", WARM_PROBE, f"127.0.0.5:{port}"],
                         capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in env.items() if k != "VLLM_HOST_IP"})
    line = [x for x in out.stdout.splitlines() if x.startswith("WARM ")]
    assert line, out.stdout[-2000:] + out.stderr[-3000:]
    return int(line[0].split()[1]), int(line[0].split()[2])


def ray_workers(ray_start: psutil.Process) -> dict[int, dict]:
    """The node's Ray worker processes (pid -> environment), skipping ones that just exited."""
    out = {}
    for p in ray_start.children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::"):
                out[p.pid] = p.environ()
        except psutil.Error:
            pass
    return out


def run(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.ray
def test_start_status_stop_roundtrip(tmp_path):
    env = {**os.environ, "VLLM_RAY_METAL_CACHE": str(tmp_path / "cache"),
           "VLLM_HOST_IP": "10.9.9.9"}
    env.pop("RAY_ADDRESS", None)
    port = free_port("127.0.0.5")
    ray_tmp = tempfile.mkdtemp(prefix="vrm-cli-")  # short: Ray's socket paths are limited
    start = run(["start", "--head", "--node-ip-address", "127.0.0.5", "--port", str(port),
                 "--units", "2", "--preload", "--", "--num-cpus=1", "--include-dashboard=false",
                 f"--temp-dir={ray_tmp}", "--disable-usage-stats",
                 f"--dashboard-agent-listen-port={free_port()}",
                 f"--ray-client-server-port={free_port()}"], env)
    assert start.returncode == 0, start.stderr[-3000:]
    assert f"Cluster address: 127.0.0.5:{port}" in start.stdout
    state = json.loads((tmp_path / "cache" / "nodes" / "127.0.0.5.json").read_text())
    ray_start = psutil.Process(state["pid"])
    daemons = ray_start.children(recursive=True)
    try:
        status = run(["status", "--address", f"127.0.0.5:{port}"], env)
        assert status.returncode == 0, status.stderr[-3000:]
        assert "127.0.0.5" in status.stdout and "METAL=2" in status.stdout
        assert "METAL units on alive nodes: 2" in status.stdout
        assert "The executor uses the Ray resource 'METAL'" in status.stdout  # and why:
        assert "vllm-ray-metal start" in status.stdout.split("Ray resource 'METAL'")[1]
        assert "VLLM_HOST_IP=10.9.9.9 is not the address of any Ray node" in status.stdout
        # --preload: the node's Ray workers have imported the MLX worker before any task
        probe = subprocess.run([sys.executable, "-c", PRELOAD_PROBE, f"127.0.0.5:{port}"],
                               capture_output=True, text=True, timeout=120,
                               env={k: v for k, v in env.items() if k != "VLLM_HOST_IP"})
        assert probe.stdout.strip().endswith("True"), probe.stdout + probe.stderr[-3000:]
        # an LLM on a --preload node: once shut down, the node pre-starts a replacement
        # worker, and the next LLM's worker actor is that (warm) process
        before = set(ray_workers(ray_start))
        used, first = warm_probe(port, env)
        assert used == 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            new = [pid for pid, environ in ray_workers(ray_start).items()
                   if pid not in before | {first} and compat_ray.PRELOAD_ENV in environ]
            if new:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"no worker was pre-started after the LLM shut down; "
                                 f"before {sorted(before)}, now {sorted(ray_workers(ray_start))}")
        assert warm_probe(port, env) == (1, new[0])
    finally:
        stop = run(["stop"], env)
    assert "Stopped Ray node 127.0.0.5" in stop.stdout
    # a later plain ray.init() must not try to join the stopped head
    recorded = compat_ray.RAY_ADDRESS_FILE
    assert not recorded.exists() or recorded.read_text().strip() != f"127.0.0.5:{port}"
    assert not ray_start.is_running() or ray_start.status() == psutil.STATUS_ZOMBIE
    gone, alive = psutil.wait_procs(daemons, timeout=20)
    assert not alive, [p.pid for p in alive]
    assert run(["stop"], env).stdout.startswith("No node started")
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.unit
def test_start_requires_head_or_address(tmp_path):
    env = {**os.environ, "VLLM_RAY_METAL_CACHE": str(tmp_path)}
    out = run(["start"], env)
    assert out.returncode == 2 and "--head" in out.stderr
