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
    """``LocalRayCluster([("127.0.0.2", {}), ("127.0.0.3", {"METAL": 1})])``; head first.

    A ``"GPU"`` entry becomes ``--num-gpus`` (what Ray's Apple GPU detection advertises on a
    Mac with plain ``ray start``). ``stock_head``: the head keeps Ray's dashboard and client
    server defaults (what ``ray.init("ray://...")`` needs), on ports of its own.
    """

    def __init__(self, nodes: list[tuple[str, dict[str, float]]], num_cpus: int = 1,
                 env: dict[str, str] | None = None, stock_head: bool = False) -> None:
        self.nodes = [RayNode(ip, res, num_cpus) for ip, res in nodes]
        self.env = env or {}  # extra environment for the raylets (and so their workers)
        self.temp_dir = tempfile.mkdtemp(prefix="vrm-ray-")
        self.head_ip = self.nodes[0].ip
        self._ports: set[int] = set()
        self.port = self._port(self.head_ip)
        self.address = f"{self.head_ip}:{self.port}"
        self.stock_head = stock_head
        self.client_port = self._port(self.head_ip)
        self.client_address = f"ray://{self.head_ip}:{self.client_port}"

    @classmethod
    def one_unit_each(cls, *octets: int) -> "LocalRayCluster":
        """Raylets on 127.0.0.<octet>, each (the head too) with one METAL unit."""
        return cls([(f"127.0.0.{i}", {"METAL": 1}) for i in octets])

    def _port(self, ip: str = "127.0.0.1") -> int:
        """A free port not yet handed to another node of this cluster."""
        while (port := free_port(ip)) in self._ports:
            pass
        self._ports.add(port)
        return port

    def _start_node(self, node: RayNode, head: bool) -> None:
        resources = dict(node.resources)
        gpus = int(resources.pop("GPU", 0))
        cmd = [RAY, "start", "--block", f"--node-ip-address={node.ip}",
               f"--num-cpus={node.num_cpus}", f"--resources={json.dumps(resources)}",
               *([f"--num-gpus={gpus}"] if gpus else []),
               "--disable-usage-stats",
               f"--dashboard-agent-listen-port={self._port()}",
               f"--dashboard-agent-grpc-port={self._port()}",
               f"--metrics-export-port={self._port()}",
               f"--runtime-env-agent-port={self._port()}"]
        if head:
            cmd += ["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
                    f"--ray-client-server-port={self.client_port}"]
            cmd += [f"--dashboard-port={self._port()}", "--dashboard-host=127.0.0.1"] \
                if self.stock_head else ["--include-dashboard=false"]
        else:
            cmd += [f"--address={self.address}"]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.env}
        env.pop("RAY_ADDRESS", None)
        log = open(self._log(node), "a")
        with log:  # the child keeps its own descriptor
            node.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def start(self, timeout: float = 120) -> "LocalRayCluster":
        """Head first, then one joining node at a time (2 cores: parallel joins time out)."""
        self._start_node(self.nodes[0], head=True)
        self._wait_started(self.nodes[0], timeout)
        for node in self.nodes[1:]:
            self._start_node(node, head=False)
            self._wait_started(node, timeout)
        self._record_pids()
        return self

    def add_node(self, ip: str, resources: dict[str, float], timeout: float = 120) -> RayNode:
        node = RayNode(ip, resources, self.nodes[0].num_cpus)
        self.nodes.append(node)
        self._start_node(node, head=False)
        self._wait_started(node, timeout)
        self._record_pids()
        return node

    def _log(self, node: RayNode) -> str:
        return os.path.join(self.temp_dir, f"node-{node.ip}.log")

    def _wait_started(self, node: RayNode, timeout: float, retries: int = 2) -> None:
        """Wait for `ray start` to report the node up; restart it if start-up failed."""
        deadline = time.time() + timeout
        attempt = 0
        while time.time() < deadline:
            with open(self._log(node)) as f:
                if f.read().count("Ray runtime started") > attempt:
                    return
            if node.proc.poll() is not None:  # e.g. "node timed out during startup"
                self._kill_group(node)
                if retries == 0 or node is self.nodes[0]:  # a head's port may still be held
                    break
                attempt += 1
                retries -= 1
                print(f"ray node {node.ip} exited with {node.proc.returncode}; restarting",
                      file=sys.stderr)
                time.sleep(2)
                self._start_node(node, head=False)
            time.sleep(0.5)
        raise TimeoutError(f"Ray node {node.ip} did not start; see {self._log(node)}")

    @staticmethod
    def _kill_group(node: RayNode) -> None:
        """Kill what a failed `ray start` left behind: its own process group."""
        try:
            os.killpg(node.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _record_pids(self) -> None:
        for node in self.nodes:
            if node.alive():
                node.pids |= {p.pid for p in psutil.Process(node.proc.pid).children(recursive=True)}

    def stop_node(self, node: RayNode, sig: int = signal.SIGTERM) -> None:
        """Stop one node by its own handle; make sure each of its daemons is gone."""
        self._record_pids()
        if node.proc is not None:
            stop_process(node.proc, sig)
        deadline = time.time() + 15
        for pid in node.pids:
            while time.time() < deadline and running(pid):
                time.sleep(0.2)
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        self._kill_group(node)  # anything else still in the node's own process group

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.stop_node(node)

    def __enter__(self) -> "LocalRayCluster":
        return self if self.nodes[0].proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal a child we started; kill it if it has not exited within ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
