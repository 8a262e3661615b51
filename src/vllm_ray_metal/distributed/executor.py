"""RayMetalExecutor: vLLM's Ray executor for MLX workers on Macs.

What differs from ``RayExecutorV2`` (vLLM 0.32), by design; the rest of upstream's start
runs as it is (``compat/vllm_executor.py`` holds those steps, with hooks for these):

* Device ids. Upstream reads ``get_accelerator_ids()[ray_device_key]``, which only lists
  Ray's built-in accelerators, so a custom key such as ``METAL`` raises ``KeyError``.
  Our worker actor reports the units of the key Ray actually assigned to it
  (``get_assigned_resources()``); :mod:`placement` turns them into per-node local ranks.
* Addresses. Every address a worker advertises or binds comes from the Ray node it runs
  on: the message queues (upstream already), the TCPStore (upstream listens on all
  interfaces; ours on the node address only), and ``VLLM_HOST_IP`` inside the worker, so
  vLLM's ``get_ip()`` agrees with Ray even when the driver's ``VLLM_HOST_IP`` or default
  route says otherwise.
* Placement. The cluster is checked before any wait; an unplaceable request fails in
  seconds with the node table and the command that fixes it (``cluster.py``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from vllm_ray_metal import envs
from vllm_ray_metal.compat import ray as compat_ray
from vllm_ray_metal.compat import vllm as compat_vllm
from vllm_ray_metal.compat import vllm_executor
from vllm_ray_metal.distributed import cluster, keys, placement
from vllm_ray_metal.distributed.worker_actor import MetalRayWorkerProc, WatchedQueue

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers


class RayMetalExecutor(vllm_executor.HookedRayExecutor):
    """Ray executor for MLX workers; select it with ``distributed_executor_backend``."""

    uses_ray: bool = True
    supports_pp: bool = True  # stages over the MLX group (engine/pipeline.py)
    worker_proc_cls = MetalRayWorkerProc

    def place_workers(self) -> Any:
        cluster.connect(keys.explicit() or keys.DEFAULT, self.parallel_config.ray_runtime_env,
                        units=self.world_size)
        pg = self.parallel_config.placement_group
        given = {k for b in (pg.bundle_specs if pg is not None else []) for k in b
                 if k in keys.KEYS}  # a group vLLM's DP launcher (or the user) made
        self.key = given.pop() if len(given) == 1 else keys.resolve().key
        keys.adopt(self.key)  # (vLLM's bundle lookup reads it next)
        self._warn_on_host_ip_mismatch()
        self._own_placement_group = None
        if pg is None:
            pg = cluster.create_placement_group(self.key, self.world_size)
            self.parallel_config.placement_group = pg
            self._own_placement_group = pg  # ours to remove (the engine may share our job)
        return pg

    def worker_actor_options(self) -> dict[str, Any]:
        if self.key == "GPU":  # Ray's built-in accelerator: asked for by count, not by name
            return dict(num_cpus=0, num_gpus=1)
        return dict(num_cpus=0, num_gpus=0, resources={self.key: 1.0})

    def prepare_workers(self, handles: list) -> list[tuple[dict[str, str], list[int]]]:
        key = self.key
        placements = ray.get([h.actor.placement_info.remote(key) for h in handles])
        ports = ray.get([h.actor.reserve_port.remote() for h in handles]) \
            if len(handles) > 1 else None  # MLX ring peers: each rank's address + a port
        nodes = cluster.list_nodes()
        plans = placement.plan_workers(placements, nodes, key, ports)
        for handle, plan in zip(handles, plans):
            handle.local_rank = plan.local_rank
        self.worker_addresses = [p.address for p in placements]
        self.worker_pids = [p.pid for p in placements]  # fault-injection tests use these
        # workers taken from --preload nodes: replaced by warm ones at shutdown
        self.preload_used = placement.preloaded_workers_used(placements, nodes)
        return [(plan.env, plan.device_ids) for plan in plans]

    def wrap_response_queue(self, queue: Any) -> WatchedQueue:
        compat_vllm.set_reader_spin(queue, envs.VLLM_RAY_METAL_MQ_SPIN_S)
        return WatchedQueue(queue, self)

    def actor_instance_id(self) -> str:
        """Unique per DP replica: vLLM suffixes ``_dp<i>`` for Ray DP, not for ``mp`` DP."""
        instance, index = self.vllm_config.instance_id, self.parallel_config.data_parallel_index
        return instance if not index or instance.endswith(f"_dp{index}") else \
            f"{instance}_dp{index}"

    def after_start(self) -> None:
        logger.info("RayMetalExecutor: %d MLX worker(s) on %s", self.world_size,
                    ", ".join(sorted(set(self.worker_addresses))))

    def shutdown(self) -> None:
        """Upstream's shutdown, safe after Ray itself has shut down, and releasing our group.

        Upstream relies on the engine-core process exiting to free the placement group;
        with the engine core in the caller's process (config.py) the caller's Ray job
        lives on, so the group this executor created is removed here, and the next
        ``LLM(...)`` in the same process can be placed.
        """
        if not ray.is_initialized():  # interpreter exit after ray.shutdown(): actors gone
            self.shutting_down = True
            self._replace_warm_workers()
            return
        if getattr(self, "is_failed", False) and not getattr(self, "_failure", None):
            self._failure = self.failure_message()  # before shutdown kills the others
        super().shutdown()
        pg, self._own_placement_group = getattr(self, "_own_placement_group", None), None
        if pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(pg)
            except Exception:  # the cluster may be gone already
                logger.debug("Could not remove placement group", exc_info=True)
            if self.parallel_config.placement_group is pg:
                self.parallel_config.placement_group = None
        self._replace_warm_workers()

    def _replace_warm_workers(self) -> None:
        """Have each --preload node start as many idle (warm) workers as this executor used.

        Ray pre-starts warm workers once, when its first driver attaches; without this
        only the first scripts on a node would start warm (bench_startup.py measures it).
        """
        used, self.preload_used = getattr(self, "preload_used", {}), {}
        if used and ray.is_initialized():  # skip nodes Ray knows are dead
            alive = {(n.address, n.manager_port) for n in cluster.list_nodes() if n.alive}
            used = {where: count for where, count in used.items() if where in alive}
        for (address, port), count in used.items():
            try:
                cluster.prestart_workers(address, port, count)
            except Exception as exc:  # the node may be gone; next start is cold, not broken
                logger.debug("Could not prestart workers on %s: %s", address, exc)

    def failure_message(self) -> str:
        """Which MLX worker died and where, for the error the caller sees."""
        if getattr(self, "_failure", None):
            return self._failure
        handles = [h for h in self.ray_worker_handles if h.run_ref is not None]
        try:
            done, _ = ray.wait([h.run_ref for h in handles], num_returns=len(handles),
                               timeout=0) if handles and ray.is_initialized() else ([], [])
        except Exception:  # the cluster itself may be gone
            done = []
        dead = [h for h in handles if h.run_ref in done]
        if not dead:
            return "The MLX executor was shut down."
        where = ", ".join(f"rank {h.rank} on {self.worker_addresses[h.rank]} "
                          f"(pid {self.worker_pids[h.rank]})" for h in dead)
        return (f"MLX worker {where} died; this engine is stopped. Create a new LLM(...) to "
                "go on: the cluster is still usable if the node is alive (the worker's log "
                "is above).")

    @staticmethod
    def _warn_on_host_ip_mismatch() -> None:
        """Ray's address wins; say so when the driver's VLLM_HOST_IP disagrees."""
        host_ip = os.environ.get("VLLM_HOST_IP")
        ray_ip = compat_ray.node_ip()
        if host_ip and host_ip != ray_ip:
            logger.warning(
                "VLLM_HOST_IP=%s differs from this process's Ray node address %s; "
                "vllm-ray-metal uses Ray's addresses for every listener (unset VLLM_HOST_IP "
                "to silence this).", host_ip, ray_ip)
