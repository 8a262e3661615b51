"""vLLM V1 worker backed by MLX (Metal on Apple Silicon, CPU elsewhere).

Implements the ``WorkerBase`` contract the engine core and executors call: device
set-up, model loading, KV-cache sizing from available memory (no profiling pass, which
would cost a full dummy forward at maximum batch size), and step execution.
"""

from __future__ import annotations

import logging
import os

from vllm_ray_metal import cpu

cpu.preload()  # before this process imports mlx.core: MLX binds its BLAS then (Linux)

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402
from vllm.v1.worker.worker_base import WorkerBase  # noqa: E402

from vllm_ray_metal.compat import vllm as compat_vllm  # noqa: E402
from vllm_ray_metal.engine import device, model_loader, pooling, tensor_parallel  # noqa: E402
from vllm_ray_metal.engine.model_runner import MLXModelRunner  # noqa: E402
from vllm_ray_metal.engine.spec import WorkerSpec  # noqa: E402

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers


class MLXWorker(WorkerBase):
    """One model replica (or, with tensor/pipeline parallelism, one rank of it)."""

    model_runner: MLXModelRunner
    draft_rpcs = 0  # take_draft_token_ids calls (node_info; tests)

    def init_device(self) -> None:
        compat_vllm.guard_accelerator_cleanup()  # in-process (uni) executors share our process
        spec = WorkerSpec.from_env()
        self.mlx_device = device.use()
        self.cpu_setup = "" if self.mlx_device.metal else \
            cpu.setup_process(spec.ranks_on_node, spec.ranks_on_host)  # before any product
        if self.cpu_setup:
            logger.info("MLX CPU backend: %s", self.cpu_setup)
        self.device = torch.device("cpu")  # torch only carries metadata; compute is MLX
        self.memory_at_start = self.mlx_device.working_set
        seed = self.model_config.seed
        mx.random.seed(seed if seed is not None else 0)
        world_size = self.parallel_config.world_size
        self.group = tensor_parallel.init_group(self.rank, world_size, spec.mlx_hosts)
        self.model_runner = MLXModelRunner(self.vllm_config, self.group)

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        if load_dummy_weights:
            raise NotImplementedError("dummy weights are not supported by vllm-ray-metal")
        self.model_runner.load_model()

    def get_model(self):
        return self.model_runner.model

    def node_info(self) -> dict:
        """Where this worker runs (for `collective_rpc("node_info")`, tests, debugging)."""
        runner = self.model_runner
        return {"rank": self.rank, "local_rank": self.local_rank, "pid": os.getpid(),
                "host_ip": os.environ.get("VLLM_HOST_IP"), "device": str(mx.default_device()),
                "cpu_setup": self.cpu_setup,
                "weight_bytes": getattr(runner, "weight_bytes", None),
                "layer_weight_bytes": getattr(runner, "layer_weight_bytes", None),
                "lora_bytes": getattr(runner, "lora_bytes", None),
                "draft_bytes": getattr(runner, "draft_bytes", None),
                "draft_rpcs": self.draft_rpcs,
                "group_size": self.group.size() if self.group is not None else 1,
                "vocab_split": model_loader.splits_vocab(runner.model, runner.vocab_group),
                "layers": list(runner.stage_layers())}

    def get_model_inspection(self) -> str:
        return repr(self.model_runner.model)  # mlx.nn.Module prints its own module tree

    def get_kv_cache_spec(self) -> dict:
        return self.model_runner.get_kv_cache_spec()

    def get_supported_kv_cache_layouts(self) -> list[str]:
        return ["NHD"]

    def determine_available_memory(self) -> int:
        """KV-cache bytes: ``kv_cache_memory_bytes`` if set, else a fraction of memory,
        less the mirror's share (``MLXModelRunner.split_kv_budget``).

        The fraction is vLLM's ``gpu_memory_utilization``, applied to the memory MLX may
        use when the worker started, minus the weights just loaded (LoRA slots and a
        draft model included) and the adapters ``max_cpu_loras`` may keep read.
        """
        explicit = self.cache_config.kv_cache_memory_bytes
        if explicit is not None:
            return self.model_runner.split_kv_budget(int(explicit),
                                                     self.get_cache_block_size_bytes())
        fraction = self.cache_config.gpu_memory_utilization
        runner = self.model_runner
        adapters = runner.lora.cache_bytes if runner.lora is not None else 0
        weights = runner.weight_bytes + runner.draft_bytes
        budget = int(fraction * self.memory_at_start) - weights - adapters
        if budget <= 0:
            raise ValueError(
                f"No memory left for the KV cache: {fraction:.0%} of "
                f"{self.memory_at_start / 2**30:.1f} GiB is less than the model's "
                f"{weights / 2**30:.1f} GiB of weights"
                + (" (draft model included)" if runner.draft_bytes else "")
                + (f" and {adapters / 2**30:.1f} GiB of LoRA adapters" if adapters else "")
                + ". Raise --gpu-memory-utilization or set --kv-cache-memory-bytes"
                + (" (or lower --max-loras / --max-cpu-loras / --max-lora-rank)."
                   if adapters else "."))
        return self.model_runner.split_kv_budget(budget, self.get_cache_block_size_bytes())

    def get_cache_block_size_bytes(self) -> int:
        layers, kv_heads, head_size = self.model_runner.kv_layout()
        itemsize = self.model_runner.dtype.size
        return 2 * layers * kv_heads * head_size * itemsize * self.cache_config.block_size

    def initialize_from_config(self, kv_cache_config) -> None:
        self.model_runner.initialize_kv_cache(kv_cache_config)

    def compile_or_warm_up_model(self):
        self.model_runner.warm_up()
        return compat_vllm.compilation_times()

    def execute_model(self, scheduler_output):
        # vLLM's two-phase step: return None and sample in sample_tokens, which brings the
        # grammar bitmask, when the step has structured-output requests; with pipeline
        # stages always (the engine's batch queue collects every output there).
        defer = scheduler_output.total_num_scheduled_tokens > 0 and (
            scheduler_output.has_structured_output_requests
            or self.parallel_config.pipeline_parallel_size > 1)
        return self.model_runner.execute_model(scheduler_output, defer=defer)

    def sample_tokens(self, grammar_output):
        return self.model_runner.sample_tokens(grammar_output)

    def take_draft_token_ids(self):
        self.draft_rpcs += 1  # (RayMetalExecutor takes drafts from the step's output)
        return self.model_runner.take_draft_token_ids()

    def get_supported_tasks(self) -> tuple[str, ...]:
        if self.model_config.runner_type == "pooling":
            return pooling.TASKS
        return ("generate",)

    def synchronize_device(self) -> None:
        mx.synchronize()

    def check_health(self) -> None:
        return

    def _lora(self):
        if self.model_runner.lora is None:
            raise ValueError("LoRA is off: start the engine with enable_lora=True "
                             "(--enable-lora).")
        return self.model_runner.lora

    def add_lora(self, lora_request) -> bool:
        return self._lora().add(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self._lora().remove(lora_id)

    def pin_lora(self, lora_id: int) -> bool:
        return self._lora().pin(lora_id)

    def list_loras(self) -> set[int]:
        return self._lora().ids() if self.model_runner.lora is not None else set()

    def shutdown(self) -> None:
        self.model_runner = None  # type: ignore[assignment]
        logger.debug("MLX worker %s (pid %d) shut down", self.rank, os.getpid())
