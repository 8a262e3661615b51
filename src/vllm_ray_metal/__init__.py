"""vLLM on Apple Silicon through MLX, on one machine or many, with Ray."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_ray_metal.default_model import default_model

__version__ = "0.1.0"
__all__ = ["RayMetalExecutor", "default_model", "__version__"]

if TYPE_CHECKING:
    from vllm_ray_metal.distributed.executor import RayMetalExecutor


RAY_MISSING = ("RayMetalExecutor needs Ray, which is not installed in this Python "
               "environment: pip install 'ray==2.60.0'.")


def __getattr__(name: str):
    # Lazy: importing the package (e.g. by vLLM's plugin loader) must not import Ray, vLLM
    # or MLX.
    if name == "RayMetalExecutor":
        try:
            from vllm_ray_metal.distributed.executor import RayMetalExecutor
        except ImportError as exc:
            if (exc.name or "").split(".")[0] != "ray":
                raise
            raise ImportError(RAY_MISSING, name="ray") from exc

        return RayMetalExecutor
    raise AttributeError(name)
