"""Configuration checks and defaults applied by the MLX platform.

Everything an MLX worker cannot do is rejected here, while vLLM builds its config in the
caller's process, so users get one clear message instead of a crash inside a worker.
"""

from __future__ import annotations

import os

from vllm_ray_metal import envs
from vllm_ray_metal.compat import ray as compat_ray
from vllm_ray_metal.compat import vllm as compat_vllm
from vllm_ray_metal.engine import model_loader, pipeline, speculative, tensor_parallel

WORKER_QUALNAME = "vllm_ray_metal.engine.worker.MLXWorker"
DEFAULT_BLOCK_SIZE = 16
EXECUTOR_QUALNAMES = {"vllm_ray_metal.RayMetalExecutor",
                      "vllm_ray_metal.distributed.executor.RayMetalExecutor",
                      "vllm_ray_metal.executor.RayMetalExecutor"}  # (the path before 0.2)


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
        model_loader.check_model_dir(model_config.model, model_config.revision)
        _reject(model_config.logprobs_mode != "raw_logprobs",
                f"logprobs_mode={model_config.logprobs_mode!r} is not supported; MLX workers "
                "return raw_logprobs (drop --logprobs-mode).")
        _reject(model_config.runner_type not in ("generate", "pooling"),
                f"runner={model_config.runner_type!r} is not supported; MLX workers run "
                "'generate' and 'pooling' (embeddings).")
        if model_config.runner_type == "pooling":
            _reject(model_config.convert_type != "embed",
                    f"convert={model_config.convert_type!r} is not supported: MLX workers "
                    "pool a decoder's hidden states into embeddings (--convert embed); "
                    "classification and reward heads are not loaded.")
            pooler = model_config.pooler_config
            _reject(pooler.task not in (None, "embed"),
                    f"pooling task {pooler.task!r} is not supported by vllm-ray-metal; MLX "
                    "workers pool one embedding per prompt (task 'embed').")
            _reject(pooler.seq_pooling_type not in ("LAST", "MEAN", "CLS")
                    or pooler.tok_pooling_type not in (None, "ALL"),
                    f"pooling_type {pooler.pooling_type!r} is not supported by "
                    "vllm-ray-metal; use --pooler-config '{\"pooling_type\": \"LAST\"}' "
                    "(or MEAN, CLS).")
            _reject(pooler.seq_pooling_type in ("MEAN", "CLS")
                    and bool(cache_config.enable_prefix_caching),
                    f"{pooler.seq_pooling_type} pooling needs the hidden state of every "
                    "prompt token, which a prefix-cache hit skips; drop "
                    "--enable-prefix-caching.")
            _reject(parallel.pipeline_parallel_size > 1,
                    "runner='pooling' with pipeline_parallel_size > 1 is not supported by "
                    "vllm-ray-metal; use tensor parallelism (--tensor-parallel-size).")
        _reject(bool(model_config.enable_prompt_embeds),
                "enable_prompt_embeds is not supported by vllm-ray-metal: MLX workers embed "
                "token ids themselves; drop --enable-prompt-embeds and send text or token "
                "ids.")
        _reject(model_config.is_multimodal_model,
                f"{model_config.model!r} is a multimodal model; vllm-ray-metal runs mlx-lm's "
                "text models only (use a text-only checkpoint).")
        model_config.enforce_eager = True
    spec = vllm_config.speculative_config
    if spec is not None:
        _reject(spec.method not in speculative.METHODS,
                f"speculative_config method {spec.method!r} is not supported by "
                f"vllm-ray-metal; use method 'ngram' (prompt lookup: "
                "--speculative-config '{\"method\": \"ngram\", "
                "\"num_speculative_tokens\": 4}') or 'draft_model' (a smaller model of "
                "the same family: '{\"method\": \"draft_model\", \"model\": \"<path or "
                "hub id>\", \"num_speculative_tokens\": 4}'), or drop --speculative-config.")
        if spec.method == "draft_model":
            _check_draft(spec.draft_model_config)
        method = getattr(spec, "rejection_sample_method", "standard")
        _reject(method != "standard",
                f"rejection_sample_method={method!r} is not supported by vllm-ray-metal "
                "(it verifies drafts by vLLM's standard rule); drop it from "
                "--speculative-config.")
        _reject(parallel.pipeline_parallel_size > 1,
                "speculative decoding with pipeline_parallel_size > 1 is not supported by "
                "vllm-ray-metal; use tensor parallelism (--tensor-parallel-size) or drop "
                "--speculative-config.")
    if vllm_config.lora_config is not None:  # (in the caller's process: the front end)
        compat_vllm.read_adapters_before_admission()
        compat_vllm.serve_bad_adapters_as_400()
    _reject(cache_config.cache_dtype not in ("auto", None),
            f"kv_cache_dtype={cache_config.cache_dtype!r} is not supported; MLX workers keep "
            "the KV cache in the model dtype (drop --kv-cache-dtype).")
    for flag in ("prefill_context_parallel_size", "decode_context_parallel_size"):
        _reject(getattr(parallel, flag, 1) > 1,
                f"{flag} > 1 is not supported by vllm-ray-metal; drop "
                f"--{flag.replace('_', '-')} (use tensor or pipeline parallelism).")
    pp = parallel.pipeline_parallel_size
    # vLLM's V1 runner turns async scheduling off with PP unless asked for explicitly; our
    # non-last stages need the token ids the scheduler sends only without it.
    _reject(pp > 1 and bool(scheduler.async_scheduling) and not vllm_config.use_v2_model_runner,
            "async_scheduling is not supported with pipeline_parallel_size > 1 by "
            "vllm-ray-metal (later stages learn sampled tokens from the scheduler, which "
            "sends them only without async scheduling); drop --async-scheduling.")
    if parallel.world_size > 1 and model_config is not None:
        try:
            module = model_loader.model_module(model_config.model, model_config.revision)
            if parallel.tensor_parallel_size > 1:
                tensor_parallel.check_tensor_parallel(
                    model_config.hf_config, parallel.tensor_parallel_size, module)
            if pp > 1:
                pipeline.check_family(module)
                pipeline.layer_ranges(model_config.get_total_num_hidden_layers(), pp)
            tensor_parallel.mlx_backend()
        except ValueError as exc:
            raise UnsupportedConfig(str(exc)) from None

    select_executor(parallel)
    if parallel.data_parallel_size > 1 or parallel.data_parallel_backend == "ray":
        # (vLLM launches Ray engine actors for backend "ray" even at data_parallel_size=1)
        _configure_data_parallel(vllm_config)
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


def _configure_data_parallel(vllm_config) -> None:
    """Replicas are Ray actors (vLLM's Ray DP backend); see data_parallel.py."""
    from vllm_ray_metal.distributed import data_parallel

    try:
        data_parallel.configure(vllm_config)
    except data_parallel.DataParallelError as exc:
        raise UnsupportedConfig(str(exc)) from None


def _ray_in_use() -> bool:
    if os.environ.get("RAY_ADDRESS"):
        return True
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def select_executor(parallel) -> None:
    """Route every Ray request, and Ray-initialised callers, to RayMetalExecutor.

    * our qualname string -> the class (so ``ParallelConfig.use_ray`` holds);
    * ``"ray"``, and the default single-process backends when Ray is initialised in this
      process or ``RAY_ADDRESS`` is set -> the class. ``VLLM_RAY_METAL_AUTO_RAY=0`` turns
      both off (stock ``"ray"`` then means vLLM's own executor).
    A class given explicitly (e.g. stock ``RayExecutorV2``) is left alone.
    """
    backend = parallel.distributed_executor_backend
    auto = envs.VLLM_RAY_METAL_AUTO_RAY
    if backend in EXECUTOR_QUALNAMES or (auto and (
            backend == "ray" or (backend in ("uni", "mp", None) and _ray_in_use()))) or (
            backend in ("mp", "uni") and parallel.world_size > 1) or (
            backend in ("mp", "uni", None) and parallel.data_parallel_backend == "ray"):
        # (several ranks need RayMetalExecutor: it builds the MLX group's peer list;
        # Ray DP replicas are Ray actors, and their workers are placed in their groups)
        try:
            from vllm_ray_metal import RayMetalExecutor
        except ImportError as exc:
            raise UnsupportedConfig(str(exc)) from None

        parallel.distributed_executor_backend = RayMetalExecutor
    if parallel.use_ray:
        _export_ray_address(parallel.world_size)  # (data_parallel.py checks DP x world)
        if parallel.data_parallel_size == 1 and parallel.data_parallel_backend != "ray":
            # The engine core only schedules (MLX runs in the Ray actors), so a spawned
            # engine process buys no overlap worth its start-up: it re-imports vLLM and
            # torch, over half of LLM(...)'s start. VLLM_ENABLE_V1_MULTIPROCESSING=1 keeps it.
            compat_vllm.prefer_inproc_engine_core()


def _export_ray_address(world_size: int) -> None:
    """Let the engine-core process join the caller's cluster, at the caller's node.

    When the caller is connected, the cluster is also checked here, so an unplaceable
    request raises in the caller's own process before any engine process is spawned.
    """
    try:
        import ray
    except ImportError:
        from vllm_ray_metal import RAY_MISSING

        raise UnsupportedConfig(RAY_MISSING) from None
    if ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        from vllm_ray_metal.distributed import cluster, keys

        # the engine process vLLM may spawn joins as a driver on this node (cluster.connect)
        os.environ[cluster.DRIVER_NODE_IP_ENV] = compat_ray.node_ip()
        cluster.check_capacity(keys.resolve().key, world_size)


def _check_draft(draft) -> None:
    """A draft model must load with mlx-lm (vLLM itself refuses another vocabulary)."""
    try:
        model_loader.check_model_dir(draft.model, draft.revision)
    except ValueError as e:
        raise ValueError(f"speculative_config.model: {e}") from None
