"""Data parallelism (``data_parallel_size=N``) on Ray: settings vLLM's DP launcher needs.

vLLM 0.32 runs DP replicas as Ray actors (``--data-parallel-backend ray``): the front-end
makes one placement group per replica, each with ``world_size`` bundles of the platform's
Ray key plus a CPU bundle for the replica's engine core, and spreads requests over the
replicas. For a dense model each replica is independent (no DP collectives), so MLX
workers need nothing new; what needs care happens in the caller's process, here:

* The DP master address. vLLM defaults it to ``get_ip()`` (``VLLM_HOST_IP`` or the
  default route), and the placement code asserts that a Ray node has that address (the
  driver-address mismatch our executor fixes for TP reappears). Ray's address of the
  caller's node is used instead.
* Packing. Upstream defaults put *all* replicas on the master node
  (``data_parallel_size_local = data_parallel_size``), which fails when each Mac
  advertises one unit. Unless the user chose (``VLLM_RAY_DP_PACK_STRATEGY`` or
  ``--data-parallel-size-local``), replicas fill the master node first, then other
  nodes (``fill``); a replica bigger than any node spans nodes (``span``).
* Capacity is checked up front with the node table and the fix (see ``cluster.py``).

With ``--data-parallel-backend mp`` the replicas' engine cores are local processes and
each replica's executor places its own workers; only the capacity is checked here (the
executor names its actors per replica, which vLLM does only for Ray DP).
"""

from __future__ import annotations

import logging
import os

from vllm_ray_metal import envs
from vllm_ray_metal.compat import ray as compat_ray
from vllm_ray_metal.compat.vllm import DP_PACK_ENV as PACK_ENV
from vllm_ray_metal.distributed import cluster, keys

logger = logging.getLogger(f"vllm.{__name__}")

_OURS = "VLLM_RAY_METAL_DP_PACK_CHOSEN"  # the value this module set (not the user's)


class DataParallelError(ValueError):
    """A data-parallel setting MLX workers cannot honour (raised as UnsupportedConfig)."""


def configure(vllm_config) -> None:
    """Check and complete a ``data_parallel_size > 1`` config in the caller's process.

    vLLM's DP launcher places replicas here, by the platform's key: it is chosen from the
    cluster first (``keys.resolve``).
    """
    parallel = vllm_config.parallel_config
    model_config = vllm_config.model_config
    dp = parallel.data_parallel_size
    if parallel.data_parallel_backend not in ("ray", "mp"):
        raise DataParallelError(
            f"data_parallel_backend={parallel.data_parallel_backend!r} is not supported by "
            "vllm-ray-metal; use --data-parallel-backend ray (replicas are placed on Ray "
            "nodes that advertise the platform's key).")
    if dp > 1 and model_config is not None and model_config.is_moe:
        raise DataParallelError(
            "data_parallel_size > 1 with a mixture-of-experts model needs DP-synchronised "
            "steps, which MLX workers do not implement; use data_parallel_size=1 (or a "
            "dense model).")
    if parallel.data_parallel_external_lb or parallel.data_parallel_hybrid_lb:
        raise DataParallelError(
            "External/hybrid DP load balancing (--data-parallel-rank, "
            "--data-parallel-start-rank, --data-parallel-hybrid-lb) is not supported by "
            "vllm-ray-metal; let one front-end spread requests (internal balancing).")
    if parallel.enable_elastic_ep:
        raise DataParallelError("--enable-elastic-ep is not supported by vllm-ray-metal.")
    if parallel.data_parallel_backend == "mp":
        _check_mp(parallel)
        return
    if not parallel.use_ray:
        raise DataParallelError(
            "data_parallel_backend='ray' needs the Ray executor: pass "
            "distributed_executor_backend='ray' (or connect to Ray first).")

    cluster.connect(keys.explicit() or keys.DEFAULT, parallel.ray_runtime_env,
                    units=dp * parallel.world_size)
    key = keys.resolve().key
    driver_ip = compat_ray.node_ip()
    nodes = [n for n in cluster.list_nodes() if n.alive]
    if parallel.data_parallel_master_ip not in {n.address for n in nodes}:
        logger.info("Data-parallel master address %s is not a Ray node address; using this "
                    "process's Ray node address %s", parallel.data_parallel_master_ip,
                    driver_ip)
        parallel.data_parallel_master_ip = driver_ip
    os.environ[cluster.DRIVER_NODE_IP_ENV] = driver_ip
    _choose_packing(parallel, key, nodes)


def _check_mp(parallel) -> None:
    """``mp`` backend: replicas' engine cores are processes on this machine.

    Each replica's executor makes its own placement group (workers wherever the key is,
    with Ray), or runs its worker in-process (without Ray). Only the total is checked.
    """
    if not parallel.use_ray:
        return
    import ray

    if ray.is_initialized():
        world = parallel.data_parallel_size * parallel.world_size
        cluster.check_capacity(keys.resolve().key, world)


def _choose_packing(parallel, key: str, nodes: list) -> None:
    """Pick ``fill``/``span`` and the master's replica count from the nodes' units."""
    dp, world = parallel.data_parallel_size, parallel.world_size
    master = parallel.data_parallel_master_ip
    units = {n.address: int(n.units(key)) for n in nodes if n.units(key) >= 1}
    table = cluster.node_table(nodes, key)
    if sum(units.values()) < dp * world:
        raise cluster.PlacementError(
            f"Cannot place data_parallel_size={dp} replicas of {world} MLX worker(s): the "
            f"cluster has {sum(units.values())} unit(s) of {key!r} on alive nodes and needs "
            f"{dp * world}.\nNodes:\n{table}\n"
            f"Fix: {cluster.fix_command(key, dp * world - sum(units.values()))}")
    if master not in units:
        raise cluster.PlacementError(
            f"The data-parallel master node {master} (this process's Ray node) advertises "
            f"no {key!r}; vLLM places replica 0 there. Run the front-end on a node with the "
            f"key, or add it: {cluster.fix_command(key, world)}.\nNodes:\n{table}")
    chosen = os.environ.get(PACK_ENV)
    if (chosen and chosen != envs.VLLM_RAY_METAL_DP_PACK_CHOSEN) or parallel.data_parallel_size_local != dp:
        return  # the user chose; vLLM's own checks apply
    if units[master] >= world:
        whole = sum(u // world for u in units.values())
        if whole < dp:
            raise cluster.PlacementError(
                f"Cannot place data_parallel_size={dp} replicas of {world} MLX worker(s): "
                f"only {whole} replica(s) fit whole on single nodes, and a replica spans "
                f"nodes only when no node can hold one.\nNodes:\n{table}\n"
                f"Fix: add units where a replica fits ({cluster.fix_command(key, world)}), "
                f"or set {PACK_ENV}=span with identical nodes.")
        os.environ[PACK_ENV] = "fill"
        parallel.data_parallel_size_local = min(dp, units[master] // world)
    elif len(set(units.values())) == 1 and world % units[master] == 0:
        os.environ[PACK_ENV] = "span"
        parallel.data_parallel_size_local = 1
    else:
        raise cluster.PlacementError(
            f"A replica of {world} MLX worker(s) fits on no single node and the nodes "
            f"advertise different numbers of {key!r} units, so replicas cannot span nodes "
            f"evenly (vLLM's span packing needs identical nodes).\nNodes:\n{table}\n"
            f"Fix: give every node the same --units, or use a smaller tensor_parallel_size.")
    os.environ[_OURS] = os.environ[PACK_ENV]  # (a later engine in this process re-chooses)
    logger.info("Data parallel: %d replica(s) of %d worker(s); %s=%s, %d on the master "
                "node %s", dp, world, PACK_ENV, os.environ[PACK_ENV],
                parallel.data_parallel_size_local, master)
