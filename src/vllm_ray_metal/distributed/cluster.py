"""Ray cluster checks for MLX workers: connect, inspect, place — and fail fast.

Stock vLLM creates a placement group and waits up to 30 minutes for it. Here the cluster
is inspected first: if no set of alive nodes can hold the bundles, the error comes at
once, lists every node with its address and resources, and says which command adds the
missing resource. Any remaining wait (resources busy with another job) is bounded by
``VLLM_RAY_METAL_PLACEMENT_TIMEOUT`` seconds (default 60).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from vllm_ray_metal import envs
from vllm_ray_metal.compat import ray as compat_ray

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers

PLACEMENT_TIMEOUT_ENV = "VLLM_RAY_METAL_PLACEMENT_TIMEOUT"
DRIVER_NODE_IP_ENV = "VLLM_RAY_METAL_DRIVER_NODE_IP"  # the caller's Ray node (config.py)
# With `vllm-ray-metal start --preload`, imported by the node's idle Ray workers (Ray's
# preload_python_modules), so an MLX worker actor starts in an already-warm process
# instead of importing vLLM, torch and MLX first. Ray pre-starts num_cpus such workers
# when the first driver attaches and does not replace them once used (the executor
# does, when it shuts down: prestart_workers). Every Ray worker of the node pays the
# imports and the memory, hence opt-in. The worker module comes first: it loads the
# BLAS before MLX (see cpu/).
WORKER_PRELOAD_MODULES = ("vllm_ray_metal.engine.worker", "vllm_ray_metal.distributed.executor")


WORKER_KEYS = ("METAL", "mlx", "GPU")  # the Ray resources MLX workers can use (keys.py)


class PlacementError(RuntimeError):
    """The cluster cannot host the requested MLX workers."""


@dataclass
class NodeInfo:
    node_id: str
    address: str
    alive: bool
    is_head: bool
    resources: dict[str, float] = field(default_factory=dict)
    hostname: str = ""  # raylets on distinct addresses of one machine share it
    manager_port: int = 0  # the raylet's gRPC port (prestart_workers)

    def units(self, key: str) -> float:
        return self.resources.get(key, 0.0) if self.alive else 0.0

    def describe(self, key: str) -> str:
        role = "head" if self.is_head else "worker"
        state = "alive" if self.alive else "DEAD"
        shown = {k: v for k, v in sorted(self.resources.items())
                 if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
        return (f"  {self.address:<15} {role:<6} {state:<5} {key}={self.resources.get(key, 0):g}"
                f"  {shown}")


def placement_timeout() -> float:
    return envs.VLLM_RAY_METAL_PLACEMENT_TIMEOUT


def list_nodes() -> list[NodeInfo]:
    import ray

    nodes = []
    for n in ray.nodes():
        res = dict(n.get("Resources") or {})
        nodes.append(NodeInfo(node_id=n["NodeID"], address=n["NodeManagerAddress"],
                              alive=bool(n["Alive"]), is_head=compat_ray.is_head(res),
                              resources=res, hostname=n.get("NodeManagerHostname", ""),
                              manager_port=int(n.get("NodeManagerPort") or 0)))
    return nodes


def gcs_address() -> str:
    import ray

    if not ray.is_initialized():  # (get_runtime_context() would start a local Ray)
        return "<head-address>:6379"
    return ray.get_runtime_context().gcs_address


def fix_command(key: str, missing: int) -> str:
    head = gcs_address()
    units = max(missing, 1)
    if key == "GPU":  # Ray's own Apple GPU detection: one unit per Mac
        return (f"on {units} more Mac(s): `ray start --address={head}` (Ray advertises each "
                "Mac's GPU by itself)")
    return (f"on each Mac that should run workers: `vllm-ray-metal start --address {head}"
            f" --units {units}` (or `ray start --address={head} --resources='{{\"{key}\": "
            f"{units}}}'`); on a single machine, start the head with the key: "
            f"`vllm-ray-metal start --head --units {units}`. On Macs, plain `ray start` on "
            "every node works too: the executor then uses Ray's own GPU resource")


def node_table(nodes: list[NodeInfo], key: str) -> str:
    if not nodes:
        return "  (no nodes)"
    return "\n".join(n.describe(key) for n in nodes)


def check_capacity(key: str, world_size: int, nodes: list[NodeInfo] | None = None) -> None:
    """Raise PlacementError at once if alive nodes cannot hold ``world_size`` bundles.

    Each bundle needs one unit of ``key``; a node with N units can host N workers.
    """
    nodes = list_nodes() if nodes is None else nodes
    total = sum(int(n.units(key)) for n in nodes)
    if total >= world_size:
        return
    if total:
        what = f"the cluster has {total} unit(s) of {key!r} on alive nodes"
    else:
        what = f"no alive node advertises the Ray resource {key!r}"
        if envs.VLLM_RAY_METAL_RAY_KEY.lower() == "auto":  # (auto looked for all of them)
            others = [k for k in WORKER_KEYS if k != key]
            what += f" (nor {' or '.join(others)}, the others MLX workers can use)"
    raise PlacementError(
        f"Cannot place {world_size} MLX worker(s): {what}, and each worker needs one.\n"
        f"Nodes:\n{node_table(nodes, key)}\n"
        f"Fix: {fix_command(key, world_size - total)}")


def connect(key: str, runtime_env: dict | None = None, units: int = 1) -> None:
    """Attach to a running cluster, or start a local single-node one with ``units`` of key."""
    import ray

    if ray.is_initialized():
        return
    compat_ray.set_osx_cluster_env()  # (macOS only)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    try:
        compat_ray.init(address or "auto", envs.VLLM_RAY_METAL_DRIVER_NODE_IP,
                        runtime_env=runtime_env)
        return
    except ConnectionError:
        if address:
            raise PlacementError(
                f"RAY_ADDRESS={address} is set but no Ray cluster answers there. Start one "
                f"with `vllm-ray-metal start --head` or unset RAY_ADDRESS.") from None
    logger.info("No Ray cluster found; starting a local one with %s=%d", key, units)
    slots = {"num_gpus": units} if key == "GPU" else {"resources": {key: units}}
    ray.init(runtime_env=runtime_env, include_dashboard=False, **slots)


def preload_env(enabled: bool) -> dict[str, str]:
    """Environment for `ray start`: with ``enabled``, idle workers import our worker modules."""
    return {compat_ray.PRELOAD_ENV: ",".join(WORKER_PRELOAD_MODULES)} if enabled else {}


def is_preloaded() -> bool:
    """True in a Ray worker of a node started with ``--preload`` (it inherits the env)."""
    return bool(os.environ.get(compat_ray.PRELOAD_ENV))


def prestart_workers(address: str, port: int, count: int) -> None:
    """Have the raylet at ``address:port`` start ``count`` idle (on a ``--preload`` node:
    warm) workers, replacing the ones an executor used. Ray's idle-worker reaper still
    applies: on a node with more idle workers than it keeps, some may be stopped."""
    compat_ray.prestart_workers(address, port, count)


def create_placement_group(key: str, world_size: int, timeout: float | None = None):
    """Create a PACK placement group of ``world_size`` bundles of ``{key: 1}``, bounded wait."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    check_capacity(key, world_size)
    timeout = placement_timeout() if timeout is None else timeout
    pg = placement_group([{key: 1.0} for _ in range(world_size)], strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout)
    if ready:
        return pg
    remove_placement_group(pg)
    nodes = list_nodes()
    check_capacity(key, world_size, nodes)  # a node may have died meanwhile
    available = ray.available_resources().get(key, 0)
    raise PlacementError(
        f"Timed out after {timeout:g}s placing {world_size} MLX worker(s) needing {key!r}: "
        f"the cluster has the units but only {available:g} are free (another job holds the "
        f"rest).\nNodes:\n{node_table(nodes, key)}\nFix: stop the other vLLM instance, add "
        f"nodes ({fix_command(key, world_size)}), or wait longer with "
        f"{PLACEMENT_TIMEOUT_ENV}=<seconds>.")
