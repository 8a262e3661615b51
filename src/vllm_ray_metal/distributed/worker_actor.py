"""The Ray actor each MLX worker runs in, and the engine's watched view of its replies.

This module is imported where actors are unpickled, before the worker module loads MLX;
it imports no MLX itself (the worker module loads the BLAS first, see ``cpu/``).
"""

from __future__ import annotations

import os
import socket
import time
import weakref
from typing import Any

import ray
from vllm.platforms import current_platform

from vllm_ray_metal.compat import ray as compat_ray
from vllm_ray_metal.compat import vllm as compat_vllm
from vllm_ray_metal.compat import vllm_executor
from vllm_ray_metal.distributed import cluster, keys
from vllm_ray_metal.distributed.placement import Placement


class MetalRayWorkerProc(vllm_executor.RayWorkerProc):
    """Upstream's RayWorkerProc plus honest placement reporting and a node-bound store."""

    def placement_info(self, key: str | None = None) -> Placement:
        """Where this actor runs and how many units of ``key`` Ray gave it.

        Ray's built-in accelerators (``GPU``) come with device ids, as upstream expects;
        a custom resource (``METAL``, ``mlx``) only with an assigned amount.
        """
        if key:
            keys.adopt(key)  # the executor's choice, declared in this process too
        key = current_platform.ray_device_key
        ctx = ray.get_runtime_context()
        ids = ctx.get_accelerator_ids().get(key)
        if ids:
            units = float(len(ids))
            try:
                devices = sorted(int(i) for i in ids)
            except ValueError:  # e.g. GPU UUIDs: local ranks then number the devices
                devices = []
        else:
            units = float(ctx.get_assigned_resources().get(key, 0.0))
            devices = []
        return Placement(ctx.get_node_id(), compat_ray.node_ip(), units, os.getpid(),
                         cluster.is_preloaded(), devices)

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        """Upstream's query, answered from assigned resources (no KeyError).

        Within one actor only the unit count is known; node-wide ids are assigned by the
        executor. This keeps the method usable for code that calls it directly.
        """
        info = self.placement_info()
        return info.node_id, list(range(int(info.units)))

    def create_dist_init_method(self) -> str:
        """Upstream's TCPStore, listening on this node's Ray address only.

        Upstream binds it on all interfaces (torch's default). MLX ranks meet over the MLX
        ring, so nothing needs it from elsewhere than the node address it advertises.
        """
        from torch.distributed import TCPStore

        host = compat_ray.node_ip()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.bind((host, 0))
        sock.listen()
        port = sock.getsockname()[1]
        self.dist_init_store = TCPStore(  # world_size=None: it never waits for peers
            host_name=host, port=port, world_size=None, is_master=True,
            wait_for_workers=False, multi_tenant=True, master_listen_fd=sock.fileno(),
            use_libuv=True)
        self.dist_init_sock = sock  # the store serves on this socket; keep it open
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"

    def reserve_port(self) -> int:
        """A free TCP port on this worker's Ray node address, for its MLX ring peer."""
        with socket.socket() as s:
            s.bind((compat_ray.node_ip(), 0))
            return s.getsockname()[1]


class WatchedQueue:
    """A worker's response queue whose blocking read stops once the executor has failed.

    Upstream waits on a dead worker's queue for the whole execute timeout (300 s); the
    worker monitor marks the executor failed within seconds, and this makes the pending
    read see it, so ``LLM.generate`` raises promptly instead of hanging. The poll step is
    short because the reader (which sleeps instead of spinning) waits on a zmq
    notification from the worker that is sometimes lost; each step costs one zmq poll
    while a reply is due. It is shorter still for a few milliseconds after a reply: a
    worker's notification that follows its last within about a millisecond is usually
    dropped (zmq's PUB socket, at a high-water mark of 1, drops it until it next
    processes commands, which it does at most once a millisecond or so), and such
    replies are the second of a two-phase step (``sample_tokens`` after
    ``execute_model``).
    """

    POLL_S = 0.01
    RECENT_S = 0.005  # after a reply, replies this soon may come without a notification
    RECENT_POLL_S = 0.002  # (vLLM's reader sleeps whole milliseconds: 1 ms a poll)

    def __init__(self, queue: Any, executor: Any) -> None:
        self._queue = queue
        self._executor = weakref.ref(executor)
        self._last_read = float("-inf")  # monotonic time of the last reply read

    def dequeue(self, timeout: float | None = None, indefinite: bool = False):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            executor = self._executor()
            if executor is None or executor.is_failed or executor.shutting_down:
                why = executor.failure_message() if executor is not None else \
                    "the executor is gone"
                raise compat_vllm.engine_dead_error(why)
            now = time.monotonic()
            step = self.RECENT_POLL_S if now - self._last_read < self.RECENT_S \
                else self.POLL_S
            if deadline is not None:
                step = max(0.0, min(step, deadline - now))
            try:
                reply = self._queue.dequeue(timeout=step)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                continue
            self._last_read = time.monotonic()
            return reply

    def __getattr__(self, name: str):
        return getattr(self._queue, name)
