"""Configuration checks and defaults applied by the MLX platform.

Everything an MLX worker cannot do is rejected here, while vLLM builds its config in the
caller's process, so users get one clear message instead of a crash inside a worker.
"""

from __future__ import annotations

import logging
import os

from vllm_ray_metal import model_loader
from vllm_ray_metal.platform import WORKER_QUALNAME

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16


class UnsupportedConfig(ValueError):
    """A vLLM setting that MLX workers cannot honour."""


def _reject(condition: bool, message: str) -> None:
    if condition:
        raise UnsupportedConfig(message)


def apply_platform_config(vllm_config) -> None:
    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    parallel = vllm_config.parallel_config
    scheduler = vllm_config.scheduler_config

    if model_config is not None:
        model_loader.check_model_dir(model_config.model)
        _reject(model_config.logprobs_mode != "raw_logprobs",
                f"logprobs_mode={model_config.logprobs_mode!r} is not supported; MLX workers "
                "return raw_logprobs (drop --logprobs-mode).")
        _reject(model_config.runner_type != "generate",
                f"runner={model_config.runner_type!r} is not supported; MLX workers only "
                "generate text.")
        model_config.enforce_eager = True
    _reject(vllm_config.speculative_config is not None,
            "Speculative decoding is not supported by vllm-ray-metal; drop "
            "--speculative-config.")
    _reject(vllm_config.lora_config is not None,
            "LoRA is not supported by vllm-ray-metal; drop --enable-lora.")
    _reject(cache_config.cache_dtype not in ("auto", None),
            f"kv_cache_dtype={cache_config.cache_dtype!r} is not supported; MLX workers keep "
            "the KV cache in the model dtype (drop --kv-cache-dtype).")
    _reject(parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1,
            "tensor_parallel_size / pipeline_parallel_size > 1 are not supported yet by "
            "vllm-ray-metal; use 1 (data parallel replicas are separate LLM instances).")

    if parallel.worker_cls == "auto":
        parallel.worker_cls = WORKER_QUALNAME
    if not cache_config.user_specified_block_size:
        cache_config.block_size = DEFAULT_BLOCK_SIZE
    # MLX steps synchronously; the runner caches its own sampled tokens between steps.
    scheduler.async_scheduling = False

    from vllm.config import CompilationMode

    compilation = vllm_config.compilation_config
    compilation.mode = CompilationMode.NONE
    compilation.cudagraph_capture_sizes = []

    # Metal and MLX state do not survive fork(); vLLM's own processes must be spawned.
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
