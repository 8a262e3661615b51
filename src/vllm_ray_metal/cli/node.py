"""Start, inspect and stop Ray nodes that advertise the MLX key (the CLI's back end).

``start`` runs ``ray start --block`` detached and records its pid: Ray ties the node's
daemons to that process, so ``stop`` ends exactly the nodes this tool started (never
``ray stop``, which kills every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from vllm_ray_metal import envs
from vllm_ray_metal.compat import ray as compat_ray
from vllm_ray_metal.distributed import cluster

DEFAULT_PORT = 6379


def state_dir() -> Path:
    path = envs.cache_root() / "nodes"
    path.mkdir(parents=True, exist_ok=True)
    return path


def route_address(host: str, port: int) -> str:
    """The local address this machine uses to reach ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def default_node_ip(head: str | None) -> str:
    if head:
        host, _, port = head.rpartition(":")
        return route_address(host, int(port or DEFAULT_PORT))
    try:
        return route_address("192.0.2.1", 9)  # TEST-NET: only consults the routing table
    except OSError:
        return "127.0.0.2"  # no route at all: a loopback alias Ray keeps as given


def detect_units() -> tuple[int, str]:
    """How many workers this machine can host, and what MLX runs on."""
    import mlx.core as mx

    if mx.metal.is_available():
        return 1, f"Metal GPU ({mx.device_info().get('device_name', 'Apple GPU')})"
    return 1, "CPU (MLX has no Metal device here)"


def start_node(*, head: bool, address: str | None, node_ip: str | None, port: int,
               key: str, units: int | None, extra: list[str], timeout: float = 60,
               preload: bool = False) -> dict:
    detected, device = detect_units()
    units = detected if units is None else units
    node_ip = node_ip or default_node_ip(None if head else address)
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    slots = [f"--num-gpus={units}"] if key == "GPU" else \
        [f"--resources={json.dumps({key: units})}"]  # (Ray refuses GPU as a custom resource)
    cmd = [ray_bin, "start", "--block", f"--node-ip-address={node_ip}", *slots, *extra]
    cmd += ["--head", f"--port={port}"] if head else [f"--address={address}"]
    env = {**os.environ, **cluster.preload_env(preload)}  # warm idle workers (cluster.py)
    compat_ray.set_osx_cluster_env(env)  # multi-node Ray on macOS
    log = state_dir() / f"{node_ip}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    gcs = f"{node_ip}:{port}" if head else address
    host, _, gport = gcs.rpartition(":")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}; see {log}")
        if "Ray runtime started" in log.read_text() or (
                head and _port_open(host, int(gport))):
            break
        time.sleep(0.5)
    else:
        os.kill(proc.pid, signal.SIGTERM)
        raise TimeoutError(f"Ray node on {node_ip} did not start within {timeout:g}s; see {log}")
    if preload:
        _prestart_workers(gcs, node_ip, env, log)
    info = {"pid": proc.pid, "node_ip": node_ip, "address": gcs, "key": key, "units": units,
            "head": head, "device": device, "log": str(log), "command": cmd}
    (state_dir() / f"{node_ip}.json").write_text(json.dumps(info, indent=2))
    return info


def _prestart_workers(gcs: str, node_ip: str, env: dict, log: Path) -> None:
    """Connect a throw-away driver at this node: Ray then pre-starts its idle workers.

    Ray pre-starts a node's workers (num_cpus of them) when a first driver attaches, and
    they outlive it; with ``preload_python_modules`` set they import vLLM and MLX in the
    background, so the next MLX worker actors start warm (see cluster.py).
    """
    with open(log, "a") as out:
        subprocess.run([sys.executable, "-m", "vllm_ray_metal.compat.ray", gcs, node_ip],
                       env=env, stdout=out, stderr=subprocess.STDOUT, timeout=60, check=False)


def _port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def started_nodes() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(state_dir().glob("*.json"))]


def stop_nodes(node_ip: str | None = None, timeout: float = 30) -> list[dict]:
    """SIGTERM the ``ray start --block`` processes this tool started (workers first)."""
    stopped = []
    nodes = [n for n in started_nodes() if node_ip in (None, n["node_ip"])]
    for info in sorted(nodes, key=lambda n: n["head"]):
        pid = info["pid"]
        if _is_our_process(info):
            os.kill(pid, signal.SIGTERM)
            deadline = time.time() + timeout
            while time.time() < deadline and _is_our_process(info):
                time.sleep(0.3)
        (state_dir() / f"{info['node_ip']}.json").unlink(missing_ok=True)
        if info["head"]:
            compat_ray.forget_cluster_address(info["address"])
        stopped.append(info)
    return stopped


def _is_our_process(info: dict) -> bool:
    """True if pid still runs the exact command we started (pids get reused)."""
    import psutil

    try:
        proc = psutil.Process(info["pid"])
        tail = info["command"][1:]  # argv[0] may be the interpreter running the ray script
        return proc.status() != psutil.STATUS_ZOMBIE and proc.cmdline()[-len(tail):] == tail
    except psutil.NoSuchProcess:
        return False
