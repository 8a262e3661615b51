"""From where Ray placed the workers to what each one is told: pure functions, no Ray.

The executor asks each worker actor where it landed (:class:`Placement`), then turns
those answers and the cluster's node list into each worker's local rank, device ids and
environment (its Ray node address as ``VLLM_HOST_IP``, and the :class:`WorkerSpec`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from vllm_ray_metal.distributed.cluster import NodeInfo, PlacementError
from vllm_ray_metal.engine.spec import WorkerSpec


@dataclass(frozen=True)
class Placement:
    """Where one worker actor runs, as it reports itself."""

    node_id: str
    address: str  # the Ray node's address
    units: float  # units of the platform's key Ray assigned to the actor
    pid: int
    preloaded: bool  # its node was started with --preload
    device_ids: list[int] = field(default_factory=list)  # Ray's ids (built-in accelerators)


@dataclass(frozen=True)
class WorkerInit:
    """What the executor hands one worker's ``initialize_worker``."""

    local_rank: int
    env: dict[str, str]
    device_ids: list[int]


def plan_workers(placements: list[Placement], nodes: list[NodeInfo], key: str,
                 ring_ports: list[int] | None = None) -> list[WorkerInit]:
    """Each rank's local rank, device ids and environment, in rank order.

    * Local rank: the worker's order among this executor's workers on its node; device ids
      are the node's ids Ray gave those workers, sorted (``GPU``), or ``0 .. n-1`` (a custom
      key has no physical ids).
    * ``ring_ports`` (several ranks): a free port each worker reserved on its node's
      address; every rank gets the whole list of ``address:port`` ring peers.
    * BLAS share: a node's cores go to as many ranks as it has key units (other replicas'
      workers may hold the units this executor does not use), at least ours; a machine's
      cores to every rank its raylets can host (loopback raylets of one machine).
    """
    for rank, p in enumerate(placements):
        if p.units <= 0:
            raise PlacementError(
                f"Worker rank {rank} on {p.address} was placed without any {key!r} unit; "
                "the placement group does not reserve the platform's key.")
    per_node: dict[str, int] = defaultdict(int)
    local_ranks = []
    for p in placements:
        local_ranks.append(per_node[p.node_id])
        per_node[p.node_id] += 1

    node_ranks = {n.node_id: int(n.units(key)) for n in nodes}
    for node_id, count in per_node.items():
        node_ranks[node_id] = max(node_ranks.get(node_id, 0), count)
    host_of = {n.node_id: n.hostname or n.node_id for n in nodes}
    host_ranks: dict[str, int] = defaultdict(int)
    for node_id, ranks in node_ranks.items():
        host_ranks[host_of.get(node_id, node_id)] += ranks

    hosts = [f"{p.address}:{port}" for p, port in zip(placements, ring_ports)] \
        if ring_ports and len(placements) > 1 else []
    node_devices: dict[str, list[int]] = defaultdict(list)
    for p in placements:
        node_devices[p.node_id] += p.device_ids
    plans = []
    for p, local_rank in zip(placements, local_ranks):
        devices = sorted(node_devices[p.node_id])
        if len(devices) != per_node[p.node_id] or len(set(devices)) != len(devices):
            devices = list(range(per_node[p.node_id]))
        spec = WorkerSpec(mlx_hosts=hosts, ranks_on_node=node_ranks[p.node_id],
                          ranks_on_host=host_ranks[host_of.get(p.node_id, p.node_id)])
        plans.append(WorkerInit(local_rank, {"VLLM_HOST_IP": p.address, **spec.to_env()},
                                devices))
    return plans


def preloaded_workers_used(placements: list[Placement], nodes: list[NodeInfo]
                           ) -> dict[tuple[str, int], int]:
    """Workers this executor takes from ``--preload`` nodes, by raylet (address, port)."""
    raylet = {n.node_id: (n.address, n.manager_port) for n in nodes}
    used: dict[tuple[str, int], int] = defaultdict(int)
    for p in placements:
        where = raylet.get(p.node_id)
        if p.preloaded and where and where[1]:
            used[where] += 1
    return dict(used)
