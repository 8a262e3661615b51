"""The CPU room: speed-ups for MLX's Linux CPU backend (our test rig), none of it run on a Mac.

The engine calls three functions and nothing else here:

* :func:`preload` before the process first imports ``mlx.core`` (the worker module does
  it at its top): MLX binds its BLAS at that import;
* :func:`setup_process` once per worker process, before its first matrix product;
* :func:`install` once per loaded model, before its first forward.

``VLLM_RAY_METAL_CPU_TUNING=0`` turns all of it off, leaving exactly the code a Mac runs;
``blas`` keeps only the BLAS library (a Mac's MLX has Accelerate) and none of the model
wrappers. On macOS every function is a no-op. This module imports no MLX itself.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from vllm_ray_metal import envs

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers
LINUX = sys.platform.startswith("linux")  # (tests stand in a Mac by setting it False)


def tuning() -> str:
    """``1`` (everything), ``blas`` (the library only) or ``0``; always ``0`` off Linux."""
    if not LINUX or envs.VLLM_RAY_METAL_DISABLE:
        return "0"
    return envs.cpu_tuning()


def preload(build: bool = True) -> str | None:
    """Load the optimised BLAS for MLX; its path, or None.

    ``build``: compile the shim first if this machine has a compiler and no build yet (a
    worker); without it an unbuilt shim means the MKL fallback. A no-op once ``mlx.core``
    is imported in this process.
    """
    if tuning() == "0":
        return None
    from vllm_ray_metal.cpu import blas

    return blas.preload(build)


def setup_process(ranks_on_node: int = 1, ranks_on_host: int = 1) -> str:
    """BLAS threads (this process's share of its node's cores) and the heap; what was done."""
    mode = tuning()
    if mode == "0":
        return "CPU tuning off"
    from vllm_ray_metal.cpu import blas, heap

    if blas.loaded is not None:
        done = f"{blas.loaded} with {blas.configure(ranks_on_node, ranks_on_host)} thread(s)"
    else:
        done = "MLX's bundled BLAS"
        if blas.missed_mlx:
            logger.warning("MLX's CPU backend runs on its bundled BLAS in this process: MLX "
                           "was imported before vllm-ray-metal could load another")
    if mode == "1" and heap.keep_freed_memory():  # a step's arrays reuse the last's pages
        done += ", freed memory kept in the heap"
    return done


def install(model: Any, dtype: Any) -> dict[str, int]:
    """Swap in the CPU wrappers of ``model``'s layers, in the order they depend on.

    ``dtype`` is the activations' MLX dtype. Returns how many modules each wrapper took
    (empty when tuning is off or MLX runs on a GPU).
    """
    if tuning() != "1":
        return {}
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return {}
    from vllm_ray_metal.cpu import fused, jit, prebuild, rmsnorm, rope, swiglu

    counts = {"rope": rope.install(model)}  # one rope table per step instead of per layer
    with jit.kernel_lock():  # its probe runs mlx-lm's compiled swiglu (no collectives)
        counts["swiglu"] = swiglu.install(model)  # float32: SwiGLU's exp through numpy
    counts["rmsnorm"] = rmsnorm.install(model)  # each norm one compiled call
    counts["fused"] = fused.install(model)  # q/k/v and gate/up as one product each
    counts["prebuilt"] = prebuild.prebuild(model, dtype)  # their kernels, one process at a time
    return counts


def build_blas() -> str | None:
    """Compile the BLAS shim now (``vllm-ray-metal build-blas``); its path, or None."""
    if not LINUX:
        return None
    from vllm_ray_metal.cpu import blas

    path = blas.build_shim()
    return str(path) if path else None
