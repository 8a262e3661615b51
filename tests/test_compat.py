"""Fails loudly when an upstream vLLM symbol that compat.py relies on changes."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import torch

from vllm_ray_metal import compat


def test_pinned_vllm_version():
    import vllm

    assert vllm.__version__.startswith(compat.VLLM_VERSION)


def test_output_types_have_the_fields_we_fill():
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, LogprobsLists, LogprobsTensors, ModelRunnerOutput

    fields = {f.name for f in dataclasses.fields(ModelRunnerOutput)}
    assert {"req_ids", "req_id_to_index", "sampled_token_ids", "logprobs",
            "prompt_logprobs_dict"} <= fields
    assert LogprobsLists._fields[:3] == ("logprob_token_ids", "logprobs", "sampled_token_ranks")
    assert LogprobsTensors._fields[:3] == ("logprob_token_ids", "logprobs", "selected_token_ranks")
    assert EMPTY_MODEL_RUNNER_OUTPUT.req_ids == []
    out = compat.model_runner_output(["a", "b"], [[1], []], None, {})
    assert out.req_id_to_index == {"a": 0, "b": 1}
    lists = compat.logprobs_lists(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros(1))
    assert lists.slice_request(0, 1).logprobs.shape == (1, 2)
    t = compat.logprobs_tensors(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1))
    assert t.selected_token_ranks.shape == (1,)


def test_kv_spec_and_worker_base():
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.worker.worker_base import WorkerBase, WorkerWrapperBase

    spec = compat.full_attention_spec(16, 3, 64, torch.float32)
    assert isinstance(spec, FullAttentionSpec)
    assert spec.page_size_bytes == 2 * 16 * 3 * 64 * 4
    for name in ("init_device", "load_model", "get_kv_cache_spec",
                 "compile_or_warm_up_model", "execute_model", "sample_tokens"):
        assert callable(getattr(WorkerBase, name)), name
    # the wrapper forwards initialize_from_config to the worker
    assert "self.worker.initialize_from_config" in inspect.getsource(
        WorkerWrapperBase.initialize_from_config)
    assert compat.compilation_times()._fields == ("language_model", "encoder")


def test_scheduler_output_fields_the_runner_reads():
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    new = {f.name for f in dataclasses.fields(NewRequestData)}
    assert {"req_id", "prompt_token_ids", "sampling_params", "block_ids",
            "num_computed_tokens"} <= new
    cached = {f.name for f in dataclasses.fields(CachedRequestData)}
    assert {"req_ids", "resumed_req_ids", "all_token_ids", "new_token_ids", "new_block_ids",
            "num_computed_tokens", "num_output_tokens"} <= cached
    so = {f.name for f in dataclasses.fields(SchedulerOutput)}
    assert {"scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens",
            "finished_req_ids", "scheduled_spec_decode_tokens"} <= so


def test_engine_core_cleanup_symbol():
    import vllm.v1.engine.core as core

    assert callable(core.cleanup_dist_env_and_memory)
    compat.guard_accelerator_cleanup()
    compat.guard_accelerator_cleanup()  # idempotent
    assert "shutdown_ray" in inspect.signature(core.cleanup_dist_env_and_memory).parameters \
        or getattr(core.cleanup_dist_env_and_memory, "_vllm_ray_metal_guard", False)


def test_vllm_cli_entry_point():
    from vllm.entrypoints.cli.main import main

    assert callable(main)


def test_ray_executor_base_methods():
    """RayMetalExecutor._init_executor relies on these RayExecutorV2/MultiprocExecutor parts."""
    syms = compat.ray_executor_symbols()
    base = syms["RayExecutorV2"]
    for name in ("_get_parallel_sizes", "_build_runtime_env", "_is_driver_worker",
                 "_post_init_executor", "start_worker_monitor", "_get_output_rank", "shutdown"):
        assert callable(getattr(base, name)), name
    proc = syms["RayWorkerProc"]
    for name in ("create_dist_init_method", "initialize_worker", "wait_for_init", "run",
                 "get_node_and_physical_gpu_ids"):
        assert callable(getattr(proc, name)), name
    fields = getattr(syms["RayWorkerHandle"], "__dataclass_fields__")
    assert {"actor", "rank", "local_rank", "node_id", "bundle_id_idx"} <= set(fields)


def test_pp_layer_range_is_vllms_split():
    from vllm.distributed.utils import get_pp_indices

    assert compat.pp_layer_range(30, 1, 2) == (15, 30)
    assert compat.pp_layer_range(5, 0, 2) == tuple(get_pp_indices(5, 0, 2)) == (0, 3)
    # ModelConfig.get_layers_start_end_indices (KV-cache layer counts) uses the same split
    from vllm.config import ModelConfig

    assert "get_pp_indices" in inspect.getsource(ModelConfig.get_layers_start_end_indices)


def test_data_parallel_touch_points():
    """data_parallel.py and compat.dp_collective_rpc rely on these vLLM 0.32 behaviours."""
    import vllm.envs as envs
    from vllm.v1.engine.core import EngineCoreActor
    from vllm.v1.engine.core_client import DPLBAsyncMPClient
    from vllm.v1.engine.utils import CoreEngineActorManager

    assert envs.VLLM_RAY_DP_PACK_STRATEGY in ("strict", "fill", "span")
    placement = inspect.getsource(CoreEngineActorManager.create_dp_placement_groups)
    for needle in ("current_platform.ray_device_key", '"fill"', '"span"', "dp_size_local",
                   "_dp_nodes_master_first"):
        assert needle in placement, needle
    # the per-replica executor receives its group through parallel_config.placement_group
    assert "parallel_config.placement_group = pg" in inspect.getsource(
        CoreEngineActorManager.__init__)
    # dense replicas are independent (no DP collectives, no dummy batches)
    assert "reconfigure_for_independent_dp_rank" in inspect.getsource(EngineCoreActor.__init__)
    # RayMetalExecutor._instance_id: Ray DP suffixes "_dp<rank>"; mp DP does not
    from vllm.config import ParallelConfig
    from vllm.v1.engine.utils import _apply_dp_identity_suffix

    assert ParallelConfig().data_parallel_index == 0
    assert '_dp{dp_rank}"' in inspect.getsource(_apply_dp_identity_suffix)
    assert inspect.iscoroutinefunction(DPLBAsyncMPClient.call_utility_all_async)
    assert "return (await self.call_utility_all_async" in inspect.getsource(
        DPLBAsyncMPClient.call_utility_async)  # (why AsyncLLM.collective_rpc sees one engine)


def test_reader_spin_is_a_spin_condition_setting():
    from vllm.distributed.device_communicators import shm_broadcast

    assert "busy_loop_s" in inspect.signature(shm_broadcast.SpinCondition.__init__).parameters
    src = inspect.getsource(shm_broadcast.SpinCondition.wait)
    assert "self.busy_loop_s" in src and "poller.poll" in src
    assert "self._spin_condition = SpinCondition(" in inspect.getsource(
        shm_broadcast.MessageQueue.__init__)
    # the writer notifies after every write, so a reader that does not spin still wakes
    assert "self._spin_condition.notify()" in inspect.getsource(shm_broadcast.MessageQueue.enqueue)


def test_pp_batch_queue_and_dist_init_contracts():
    """worker.py (PP output via sample_tokens) and executor.py (TCPStore override) rely on:"""
    from vllm.v1.engine.core import EngineCore

    queue = inspect.getsource(EngineCore.step_with_batch_queue)
    assert "model_executed = scheduler_output.total_num_scheduled_tokens > 0" in queue
    assert "self.model_executor.sample_tokens(" in queue
    proc = compat.ray_executor_symbols()["RayWorkerProc"]
    assert "self._dist_init_store = store" in inspect.getsource(proc.create_dist_init_method)


def test_inproc_engine_default_is_read_after_config_creation(monkeypatch):
    """config.py's default only works if LLMEngine reads the variable after the config."""
    from vllm.v1.engine.llm_engine import LLMEngine

    src = inspect.getsource(LLMEngine.from_engine_args)
    assert src.index("create_engine_config(") < src.index(compat.INPROC_ENGINE_ENV)
    monkeypatch.delenv(compat.INPROC_ENGINE_ENV, raising=False)
    assert compat.prefer_inproc_engine_core()
    monkeypatch.setenv(compat.INPROC_ENGINE_ENV, "1")  # the user's choice wins
    assert not compat.prefer_inproc_engine_core()


def test_engine_dead_error_carries_our_reason():
    from vllm.v1.engine.exceptions import EngineDeadError

    err = compat.engine_dead_error("MLX worker rank 1 on 127.0.0.3 (pid 7) died")
    assert isinstance(err, EngineDeadError) and str(err).startswith("MLX worker rank 1")
