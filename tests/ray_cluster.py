"""Throw-away Ray clusters of several raylets on loopback addresses, for tests.

Each node is one ``ray start --block`` process that this helper owns (a Popen handle):
Ray ties the node's daemons to it, so terminating that pid stops exactly this node and
nothing else on the machine (never ``ray stop``). Every cluster gets its own temp dir
and free ports, so its address file never points other drivers at it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


@dataclass
class RayNode:
    ip: str
    resources: dict[str, float]
    num_cpus: int = 1
    proc: subprocess.Popen | None = None
    pids: set[int] = field(default_factory=set)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalRayCluster:
    """``LocalRayCluster([("127.0.0.2", {}), ("127.0.0.3", {"METAL": 1})])``; head first."""

    def __init__(self, nodes: list[tuple[str, dict[str, float]]], num_cpus: int = 1,
                 env: dict[str, str] | None = None) -> None:
        self.nodes = [RayNode(ip, res, num_cpus) for ip, res in nodes]
        self.env = env or {}  # extra environment for the raylets (and so their workers)
        self.temp_dir = tempfile.mkdtemp(prefix="vrm-ray-")
        self.head_ip = self.nodes[0].ip
        self.port = free_port(self.head_ip)
        self.address = f"{self.head_ip}:{self.port}"

    def _start_node(self, node: RayNode, head: bool) -> None:
        cmd = [RAY, "start", "--block", f"--node-ip-address={node.ip}",
               f"--num-cpus={node.num_cpus}", f"--resources={json.dumps(node.resources)}",
               "--disable-usage-stats",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}"]
        if head:
            cmd += ["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
                    "--include-dashboard=false", f"--ray-client-server-port={free_port()}"]
        else:
            cmd += [f"--address={self.address}"]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.env}
        env.pop("RAY_ADDRESS", None)
        node.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env, start_new_session=True)

    def start(self, timeout: float = 90) -> "LocalRayCluster":
        self._start_node(self.nodes[0], head=True)
        self._wait_port(timeout)
        for node in self.nodes[1:]:
            self._start_node(node, head=False)
        self.wait_alive(len(self.nodes), timeout)
        return self

    def add_node(self, ip: str, resources: dict[str, float], timeout: float = 90) -> RayNode:
        node = RayNode(ip, resources, self.nodes[0].num_cpus)
        self.nodes.append(node)
        self._start_node(node, head=False)
        self.wait_alive(sum(n.alive() for n in self.nodes), timeout)
        return node

    def _wait_port(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                socket.create_connection((self.head_ip, self.port), timeout=1).close()
                return
            except OSError:
                if not self.nodes[0].alive():
                    raise RuntimeError("ray head exited during start")
                time.sleep(0.3)
        raise TimeoutError(f"Ray head {self.address} did not open its port")

    def alive_count(self) -> int:
        probe = ("import ray,sys; ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], "
                 "logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))")
        out = subprocess.run([sys.executable, "-c", probe, self.address, self.head_ip],
                             capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        try:
            return int(out.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return 0

    def wait_alive(self, count: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.alive_count() >= count:
                self._record_pids()
                return
            time.sleep(1)
        raise TimeoutError(f"{count} Ray nodes did not come up at {self.address}")

    def _record_pids(self) -> None:
        for node in self.nodes:
            if node.alive():
                node.pids |= {p.pid for p in psutil.Process(node.proc.pid).children(recursive=True)}

    def stop_node(self, node: RayNode, sig: int = signal.SIGTERM) -> None:
        """Stop one node by its own handle; make sure each of its daemons is gone."""
        self._record_pids()
        if node.alive():
            node.proc.send_signal(sig)
            try:
                node.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=10)
        deadline = time.time() + 15
        for pid in node.pids:
            while time.time() < deadline and _running(pid):
                time.sleep(0.2)
            if _running(pid):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.stop_node(node)

    def __enter__(self) -> "LocalRayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
