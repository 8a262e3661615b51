"""RayMetalExecutor: vLLM's Ray executor for a platform whose Ray resource is custom.

What differs from ``RayExecutorV2`` (vLLM 0.32), by design:

* Device ids. Upstream reads ``get_accelerator_ids()[ray_device_key]``, which only lists
  Ray's built-in accelerators, so a custom key such as ``METAL`` raises ``KeyError``.
  Our worker actor reports the units of the key Ray actually assigned to it
  (``get_assigned_resources()``); the executor turns them into per-node local ranks and
  device ids.
* Addresses. Every address a worker advertises or binds comes from the Ray node it runs
  on: the message queues (upstream already), the TCPStore (upstream listens on all
  interfaces; ours on the node address only), and ``VLLM_HOST_IP`` inside
  the worker, so vLLM's ``get_ip()`` (gloo, ring peers) agrees with Ray even when the
  driver's ``VLLM_HOST_IP`` or default route says otherwise.
* Placement. The cluster is checked before any wait; an unplaceable request fails in
  seconds with the node table and the command that fixes it (see ``cluster.py``).
"""

from __future__ import annotations

import logging
import json
import os
import socket
import threading
import time
import weakref
from collections import defaultdict, deque
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from vllm.platforms import current_platform

from vllm_ray_metal import blas, cluster, compat, parallel

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers

_V = compat.ray_executor_symbols()
MQ_SPIN_ENV = "VLLM_RAY_METAL_MQ_SPIN_S"


class MetalRayWorkerProc(_V["RayWorkerProc"]):
    """The worker actor: upstream's RayWorkerProc plus honest placement reporting."""

    def placement_info(self) -> tuple[str, str, float, int, bool]:
        """(node id, Ray node address, units of the platform's key assigned to us, pid,
        whether this worker's node was started with ``--preload``)."""
        ctx = ray.get_runtime_context()
        key = current_platform.ray_device_key
        units = float(ctx.get_assigned_resources().get(key, 0.0))
        return (ctx.get_node_id(), ray.util.get_node_ip_address(), units, os.getpid(),
                cluster.is_preloaded())

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        """Upstream's query, answered from assigned resources (no KeyError).

        Within one actor only the unit count is known; node-wide ids are assigned by
        the executor. This keeps the method usable for code that calls it directly.
        """
        node_id, _, units, *_ = self.placement_info()
        return node_id, list(range(int(units)))

    def create_dist_init_method(self) -> str:
        """Upstream's TCPStore, listening on this node's Ray address only.

        Upstream binds it on all interfaces (torch's default). MLX ranks meet over the MLX
        ring, so nothing here needs it from elsewhere than the node address it advertises.
        """
        from torch.distributed import TCPStore

        host = ray.util.get_node_ip_address()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.bind((host, 0))
        sock.listen()
        port = sock.getsockname()[1]
        self._dist_init_store = TCPStore(  # world_size=None: it never waits for peers
            host_name=host, port=port, world_size=None, is_master=True,
            wait_for_workers=False, multi_tenant=True, master_listen_fd=sock.fileno(),
            use_libuv=True)
        self._dist_init_sock = sock  # the store serves on this socket; keep it open
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"

    def reserve_port(self) -> int:
        """A free TCP port on this worker's Ray node address, for its MLX ring peer."""
        with socket.socket() as s:
            s.bind((ray.util.get_node_ip_address(), 0))
            return s.getsockname()[1]


class _WatchedQueue:
    """A worker's response queue whose blocking read stops once the executor has failed.

    Upstream waits on a dead worker's queue for the whole execute timeout (300 s); the
    worker monitor marks the executor failed within seconds, and this makes the pending
    read see it, so ``LLM.generate`` raises promptly instead of hanging.

    The poll step is short because the reader (which sleeps instead of spinning, see
    ``response_spin_s``) waits on a zmq notification from the worker that is sometimes
    lost: 5-6 times in each start of ``LLM(...)`` here, each then sleeping for the whole
    step. With a 1 s step that was ~2 s of a 4.2-5.3 s start on a ``--preload`` node;
    with 10 ms the start takes 2.2 s. Each step costs one zmq poll while the reply is due.
    """

    POLL_S = 0.01

    def __init__(self, queue, executor: "RayMetalExecutor") -> None:
        self._queue = queue
        self._executor = weakref.ref(executor)

    def dequeue(self, timeout: float | None = None, indefinite: bool = False):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            executor = self._executor()
            if executor is None or executor.is_failed or executor.shutting_down:
                why = executor.failure_message() if executor is not None else \
                    "the executor is gone"
                raise compat.engine_dead_error(why)
            step = self.POLL_S if deadline is None else \
                max(0.0, min(self.POLL_S, deadline - time.monotonic()))
            try:
                return self._queue.dequeue(timeout=step)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    def __getattr__(self, name: str):
        return getattr(self._queue, name)


class RayMetalExecutor(_V["RayExecutorV2"]):
    """Ray executor for MLX workers; select it with ``distributed_executor_backend``."""

    uses_ray: bool = True
    supports_pp: bool = True  # stages over the MLX group (pipeline.py); output: last stage
    worker_proc_cls = MetalRayWorkerProc

    def _init_executor(self) -> None:
        compat.guard_accelerator_cleanup()
        self._finalizer = weakref.finalize(self, self.shutdown)
        self.is_failed = False
        self.failure_callback = None
        self.shutting_down = False
        self.shutdown_lock = threading.Lock()

        key = current_platform.ray_device_key
        tp_size, pp_size, pcp_size = self._get_parallel_sizes()
        cluster.connect(key, self.parallel_config.ray_runtime_env, units=self.world_size)
        self._warn_on_host_ip_mismatch()
        pg = self.parallel_config.placement_group
        self._own_placement_group = None
        if pg is None:
            pg = cluster.create_placement_group(key, self.world_size)
            self.parallel_config.placement_group = pg
            self._own_placement_group = pg  # ours to remove (the engine may share our job)
        bundles = _V["get_bundles_sorted_by_node"](pg)[: self.world_size]
        driver_node = ray.get_runtime_context().get_node_id()

        n_local = sum(1 for _, node_id, _ in bundles if node_id == driver_node)
        self.rpc_broadcast_mq = _V["MessageQueue"](
            self.world_size, n_local, max_chunk_bytes=_V["mq_max_chunk_bytes"],
            connect_ip=ray.util.get_node_ip_address())
        input_handle = self.rpc_broadcast_mq.export_handle()
        self.driver_env_vars = _V["get_driver_env_vars"](
            worker_specific_vars=_V["WORKER_SPECIFIC_ENV_VARS"])

        actor_cls = ray.remote(self.worker_proc_cls)
        options: dict[str, Any] = dict(num_cpus=0, num_gpus=0, resources={key: 1.0},
                                       runtime_env=self._build_runtime_env())
        self.ray_worker_handles = []
        for rank, (bundle_idx, node_id, _) in enumerate(bundles):
            actor = actor_cls.options(
                name=_V["build_actor_name"](self._instance_id(), rank, tp_size, pp_size,
                                            pcp_size),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=bundle_idx),
                **options,
            ).remote(vllm_config=self.vllm_config, rank=rank,
                     input_shm_handle=input_handle,
                     is_driver_worker=self._is_driver_worker(rank),
                     is_driver_node=node_id == driver_node)
            self.ray_worker_handles.append(_V["RayWorkerHandle"](
                actor=actor, rank=rank, local_rank=-1, node_id=node_id,
                bundle_id_idx=bundle_idx))

        placements = ray.get([h.actor.placement_info.remote() for h in self.ray_worker_handles])
        self.worker_addresses = self._assign_local_ranks(placements, key)
        self.worker_pids = [p[3] for p in placements]  # fault-injection tests use these

        init_method = ray.get(self.ray_worker_handles[0].actor.create_dist_init_method.remote())
        worker_env = [{"VLLM_HOST_IP": address} for _, address, *_ in placements]
        if self.world_size > 1:  # MLX ring peers: each rank's Ray address + a free port there
            ports = ray.get([h.actor.reserve_port.remote() for h in self.ray_worker_handles])
            hosts = json.dumps([f"{p[1]}:{port}" for p, port in zip(placements, ports)])
            for env in worker_env:
                env[parallel.HOSTS_ENV] = hosts
        per_node = defaultdict(int)
        for node_id, *_ in placements:
            per_node[node_id] += 1
        # BLAS thread share: a node's cores go to as many ranks as it has key units (other
        # replicas' workers may hold the ones this executor does not use), at least ours
        nodes = cluster.list_nodes()
        node_ranks = {n.node_id: int(n.units(key)) for n in nodes}
        for node_id, count in per_node.items():
            node_ranks[node_id] = max(node_ranks.get(node_id, 0), count)
        # ... and a machine's cores to every rank its raylets can host (loopback raylets
        # of one host): MKL's threads may spin between products only if none is shared
        host_of = {n.node_id: n.hostname or n.node_id for n in nodes}
        host_ranks = defaultdict(int)
        for node_id, ranks in node_ranks.items():
            host_ranks[host_of.get(node_id, node_id)] += ranks
        # workers this executor uses on --preload nodes: replaced by warm ones at shutdown
        raylet = {n.node_id: (n.address, n.manager_port) for n in nodes}
        self._preload_used: dict[tuple[str, int], int] = defaultdict(int)
        for node_id, *_, preloaded in placements:
            where = raylet.get(node_id)
            if preloaded and where and where[1]:
                self._preload_used[where] += 1
        for env, (node_id, *_) in zip(worker_env, placements):
            env[blas.NODE_RANKS_ENV] = str(node_ranks[node_id])
            env[blas.HOST_RANKS_ENV] = str(host_ranks[host_of.get(node_id, node_id)])
        ray.get([
            h.actor.initialize_worker.remote(
                h.local_rank, env, init_method, self.driver_env_vars,
                assigned_physical_gpu_ids=list(range(per_node[node_id])))
            for h, env, (node_id, *_) in zip(self.ray_worker_handles, worker_env, placements)
        ])

        results = ray.get([h.actor.wait_for_init.remote() for h in self.ray_worker_handles])
        self.response_mqs = []
        for rank, result in enumerate(results):
            if result["status"] != MetalRayWorkerProc.READY_STR:
                raise RuntimeError(f"MLX worker rank {rank} failed to initialize: {result}")
            queue = _V["MessageQueue"].create_from_handle(result["handle"], 0)
            compat.set_reader_spin(queue, self.response_spin_s())
            self.response_mqs.append(_WatchedQueue(queue, self))
        for handle in self.ray_worker_handles:
            handle.run()  # workers subscribe inside run(); start before the barrier
        self.rpc_broadcast_mq.wait_until_ready()
        for mq in self.response_mqs:
            mq.wait_until_ready()

        self.futures_queue = deque()
        self._post_init_executor()
        self.start_worker_monitor()
        self.output_rank = self._get_output_rank()
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
        used, self._preload_used = getattr(self, "_preload_used", {}), {}
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

    def _instance_id(self) -> str:
        """Unique per DP replica: vLLM suffixes ``_dp<i>`` for Ray DP, not for ``mp`` DP."""
        instance, index = self.vllm_config.instance_id, self.parallel_config.data_parallel_index
        return instance if not index or instance.endswith(f"_dp{index}") else \
            f"{instance}_dp{index}"

    @staticmethod
    def response_spin_s() -> float:
        """Seconds the engine busy-waits for worker output before sleeping on a notification.

        0 by default (vLLM spins for 1 s, which on a CPU backend steals a core from the
        step it waits for); ``VLLM_RAY_METAL_MQ_SPIN_S`` sets it.
        """
        return float(os.environ.get(MQ_SPIN_ENV, "0") or 0)

    def _assign_local_ranks(self, placements: list[tuple], key: str) -> list[str]:
        """Local rank = order among this executor's workers on the same node."""
        seen: dict[str, int] = defaultdict(int)
        for handle, (node_id, address, units, *_) in zip(self.ray_worker_handles, placements):
            if units <= 0:
                raise cluster.PlacementError(
                    f"Worker rank {handle.rank} on {address} was placed without any {key!r} "
                    "unit; the placement group does not reserve the platform's key.")
            handle.local_rank = seen[node_id]
            seen[node_id] += 1
        return [p[1] for p in placements]

    @staticmethod
    def _warn_on_host_ip_mismatch() -> None:
        """Ray's address wins; say so when the driver's VLLM_HOST_IP disagrees."""
        host_ip = os.environ.get("VLLM_HOST_IP")
        ray_ip = ray.util.get_node_ip_address()
        if host_ip and host_ip != ray_ip:
            logger.warning(
                "VLLM_HOST_IP=%s differs from this process's Ray node address %s; "
                "vllm-ray-metal uses Ray's addresses for every listener (unset VLLM_HOST_IP "
                "to silence this).", host_ip, ray_ip)
