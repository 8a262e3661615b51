"""vLLM's Ray executor (``vllm/v1/executor/ray_executor_v2.py``, 0.32) with hooks.

Upstream's ``RayExecutorV2._init_executor`` hard-codes the worker actor class
(``ray.remote(RayWorkerProc)``), the placement (``initialize_ray_cluster``, which waits
up to 1800 s), the device-id query (``get_accelerator_ids()[key]``, a ``KeyError`` for a
custom key) and empty per-worker environments. :class:`HookedRayExecutor` runs the same
steps in the same order, with those four decisions behind methods a subclass provides;
``patches/`` proposes the first two hooks upstream. It also takes speculative
decoding's drafts from each step's output rather than by a second call to the worker.
Everything else (queues, actor names, driver environment, the worker monitor, shutdown)
is upstream's own code.

This module imports Ray; only the distributed room loads it.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from concurrent.futures import Future
from typing import Any

import ray
import vllm.envs as vllm_envs
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
from vllm.v1.executor.ray_env_utils import get_driver_env_vars
from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerHandle, RayWorkerProc
from vllm.v1.executor.ray_utils import (WORKER_SPECIFIC_ENV_VARS, build_actor_name,
                                        get_bundles_sorted_by_node)

from vllm_ray_metal.compat.ray import node_ip
from vllm_ray_metal.compat.vllm import detach_drafts, guard_accelerator_cleanup

__all__ = ["HookedRayExecutor", "MessageQueue", "RayWorkerHandle", "RayWorkerProc",
           "bundles_by_node"]


def bundles_by_node(placement_group: Any) -> list[tuple[int, str, str]]:
    """vLLM's ``get_bundles_sorted_by_node``: (bundle index, node id, node ip), driver first."""
    return get_bundles_sorted_by_node(placement_group)


class HookedRayExecutor(RayExecutorV2):
    """``RayExecutorV2`` whose placement, actor and per-worker set-up are overridable.

    Subclasses set :attr:`worker_proc_cls` and implement the hook methods.
    """

    worker_proc_cls: type[RayWorkerProc] = RayWorkerProc

    # ---- hooks ------------------------------------------------------------------
    def place_workers(self) -> Any:
        """Connect to Ray and return a placement group of ``world_size`` bundles."""
        raise NotImplementedError

    def worker_actor_options(self) -> dict[str, Any]:
        """Ray actor options (resources, runtime env) for every worker actor."""
        raise NotImplementedError

    def prepare_workers(self, handles: list[RayWorkerHandle]
                        ) -> list[tuple[dict[str, str], list[int]]]:
        """Set each handle's ``local_rank``; return each worker's (env, device ids)."""
        raise NotImplementedError

    def wrap_response_queue(self, queue: MessageQueue) -> Any:
        """The object the executor reads a worker's replies from (default: the queue)."""
        return queue

    def actor_instance_id(self) -> str:
        return self.vllm_config.instance_id

    # ---- shutdown -----------------------------------------------------------------
    # RayExecutorV2.shutdown joins the worker monitor (RayExecutorV2._join_monitor_thread)
    # before it kills the workers, and the monitor sits in a 5 s ray.wait poll: every
    # engine shutdown waited 0-5 s for nothing. Killing the workers first ends that wait at
    # once (their run refs fail, the monitor sees shutting_down and returns); Ray itself
    # is not torn down before the join, which is what the upstream order protects against.
    def _join_monitor_thread(self) -> None:
        """Deferred: :meth:`shutdown` joins the monitor after the workers are killed."""

    def shutdown(self) -> None:
        super().shutdown()
        RayExecutorV2._join_monitor_thread(self)

    def after_start(self) -> None:
        """Called once every worker is up and the monitor runs."""

    # ---- speculative decoding's drafts ---------------------------------------------
    # EngineCore.post_step calls take_draft_token_ids after every step, upstream a
    # collective_rpc: a second round trip whose reply follows the step's within a
    # millisecond, when the worker's zmq notification is often dropped, so the read
    # waits out a poll step. Our workers attach the drafts to the step's output
    # (compat.vllm.attach_drafts); once one has, they are taken from there.
    def execute_model(self, scheduler_output: Any, non_block: bool = False) -> Any:
        return self._keeping_drafts(super().execute_model(scheduler_output,
                                                          non_block=non_block))

    def sample_tokens(self, grammar_output: Any, non_block: bool = False) -> Any:
        return self._keeping_drafts(super().sample_tokens(grammar_output,
                                                          non_block=non_block))

    def take_draft_token_ids(self) -> Any:
        if not self._drafts_ride_outputs:
            return super().take_draft_token_ids()
        drafts, self._step_drafts = self._step_drafts, None
        return drafts

    def _keeping_drafts(self, result: Any) -> Any:
        if isinstance(result, Future):  # (non_block: kept when the engine reads it)
            result.add_done_callback(self._keep_drafts_of)
        else:
            self._keep_drafts(result)
        return result

    def _keep_drafts_of(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._keep_drafts(future.result())

    def _keep_drafts(self, output: Any) -> None:
        carried, drafts = detach_drafts(output)
        if carried:
            self._drafts_ride_outputs, self._step_drafts = True, drafts

    # ---- upstream's steps -----------------------------------------------------------
    def _init_executor(self) -> None:
        guard_accelerator_cleanup()
        self._finalizer = weakref.finalize(self, self.shutdown)
        self.is_failed = False
        self.failure_callback = None
        self.shutting_down = False
        self.shutdown_lock = threading.Lock()
        self._drafts_ride_outputs, self._step_drafts = False, None

        tp_size, pp_size, pcp_size = self._get_parallel_sizes()  # (also sets world_size)
        placement_group = self.place_workers()
        bundles = bundles_by_node(placement_group)[: self.world_size]
        driver_node = ray.get_runtime_context().get_node_id()

        n_local = sum(1 for _, node_id, _ in bundles if node_id == driver_node)
        self.rpc_broadcast_mq = MessageQueue(
            self.world_size, n_local,
            max_chunk_bytes=vllm_envs.VLLM_MQ_MAX_CHUNK_BYTES_MB * 1024 * 1024,
            connect_ip=node_ip())
        input_handle = self.rpc_broadcast_mq.export_handle()
        self.driver_env_vars = get_driver_env_vars(
            worker_specific_vars=WORKER_SPECIFIC_ENV_VARS)

        actor_cls = ray.remote(self.worker_proc_cls)
        options = {"runtime_env": self._build_runtime_env(), **self.worker_actor_options()}
        self.ray_worker_handles: list[RayWorkerHandle] = []
        for rank, (bundle_idx, node_id, _) in enumerate(bundles):
            actor = actor_cls.options(
                name=build_actor_name(self.actor_instance_id(), rank, tp_size, pp_size,
                                      pcp_size),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=bundle_idx),
                **options,
            ).remote(vllm_config=self.vllm_config, rank=rank, input_shm_handle=input_handle,
                     is_driver_worker=self._is_driver_worker(rank),
                     is_driver_node=node_id == driver_node)
            self.ray_worker_handles.append(RayWorkerHandle(
                actor=actor, rank=rank, local_rank=-1, node_id=node_id,
                bundle_id_idx=bundle_idx))

        # rank 0's store first: it holds its port while prepare_workers reserves others
        init_method = ray.get(self.ray_worker_handles[0].actor.create_dist_init_method.remote())
        inits = self.prepare_workers(self.ray_worker_handles)
        ray.get([h.actor.initialize_worker.remote(h.local_rank, env, init_method,
                                                  self.driver_env_vars,
                                                  assigned_physical_gpu_ids=device_ids)
                 for h, (env, device_ids) in zip(self.ray_worker_handles, inits)])

        results = ray.get([h.actor.wait_for_init.remote() for h in self.ray_worker_handles])
        self.response_mqs = []
        for rank, result in enumerate(results):
            if result["status"] != self.worker_proc_cls.READY_STR:
                raise RuntimeError(f"MLX worker rank {rank} failed to initialize: {result}")
            queue = MessageQueue.create_from_handle(result["handle"], 0)
            self.response_mqs.append(self.wrap_response_queue(queue))
        for handle in self.ray_worker_handles:
            handle.run()  # workers subscribe inside run(); start before the barrier
        self.rpc_broadcast_mq.wait_until_ready()
        for mq in self.response_mqs:
            mq.wait_until_ready()

        self.futures_queue = deque()
        self._post_init_executor()
        self.start_worker_monitor()
        self.output_rank = self._get_output_rank()
        self.after_start()
