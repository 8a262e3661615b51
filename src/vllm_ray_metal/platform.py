"""The MLX platform plugin for vLLM (entry point group ``vllm.platform_plugins``).

vLLM asks each plugin whether it is active; ours is when MLX is importable and
``VLLM_RAY_METAL_DISABLE`` is not set. The platform tells vLLM which worker to run,
which Ray resource marks a usable node (``METAL`` by default, ``VLLM_RAY_METAL_RAY_KEY``
to change it, e.g. ``mlx`` for clusters started the vllm-metal way), and rejects
settings MLX workers cannot honour, at configuration time with a message naming the fix
(``config.py``). It imports neither MLX nor the engine until vLLM asks for them.
"""

from __future__ import annotations

import importlib.util

import torch
from vllm.platforms.interface import Platform, PlatformEnum

from vllm_ray_metal import cpu, envs
from vllm_ray_metal.compat import vllm as compat_vllm

PLATFORM_QUALNAME = "vllm_ray_metal.platform.MLXPlatform"

compat_vllm.register_environment_variables(envs.environment_variables)


def activate() -> str | None:
    """Entry point: our platform's qualname when MLX can run here, else None."""
    if envs.VLLM_RAY_METAL_DISABLE:
        return None
    if importlib.util.find_spec("mlx") is None:
        return None
    return PLATFORM_QUALNAME


def ray_resource_key() -> str:
    """The key until a cluster is seen: the one ``VLLM_RAY_METAL_RAY_KEY`` names, else
    ``METAL``; the executor then chooses from the cluster's nodes (distributed/keys.py)."""
    value = envs.VLLM_RAY_METAL_RAY_KEY
    return "METAL" if value.lower() == "auto" else value


class MLXPlatform(Platform):
    _enum = PlatformEnum.OOT
    device_name: str = "cpu"  # vLLM builds torch.device(device_name); tensors stay on CPU
    device_type: str = "cpu"
    dispatch_key: str = "CPU"
    ray_device_key: str = ray_resource_key()
    device_control_env_var: str = "VLLM_RAY_METAL_VISIBLE_DEVICES"
    dist_backend: str = "gloo"
    simple_compile_backend: str = "eager"
    supported_quantization: list[str] = []

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def import_kernels(cls) -> None:
        """MLX needs none of vLLM's compiled ops (``vllm._C`` may not even load here)."""

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        cpu.preload(build=False)  # before MLX loads in this process (see cpu/)
        from vllm_ray_metal.engine import device

        return device.query().name

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        cpu.preload(build=False)
        from vllm_ray_metal.engine import device

        return device.query().working_set

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return False

    @classmethod
    def inference_mode(cls):
        return torch.no_grad()

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        raise NotImplementedError("MLX workers run attention inside mlx-lm; no vLLM "
                                  "attention backend is used")

    @classmethod
    def get_current_memory_usage(cls, device=None) -> float:
        import mlx.core as mx

        return float(mx.get_active_memory())

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        # An engine is being configured: if it runs in this process, MLX (which the checks
        # below import) must bind to the tuned BLAS; a shim not built yet is left to workers
        cpu.preload(build=False)
        from vllm_ray_metal.config import apply_platform_config

        apply_platform_config(vllm_config)

    @classmethod
    def update_block_size_for_backend(cls, vllm_config) -> None:
        """No vLLM attention backend constrains the block size: the paged cache is ours."""

    @classmethod
    def verify_quantization(cls, quant: str) -> None:
        raise ValueError(
            f"vLLM quantization method {quant!r} is not supported on MLX. Use an "
            "mlx-community quantized checkpoint (quantized by mlx-lm) instead.")

    @classmethod
    def use_custom_allreduce(cls) -> bool:
        return False

    @classmethod
    def support_hybrid_kv_cache(cls) -> bool:
        return False
