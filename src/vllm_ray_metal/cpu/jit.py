"""MLX's fused CPU kernels: whether they build here, and one builder at a time.

On the CPU, ``mx.compile`` turns a chain of element-wise ops into C++ source, builds it
with ``g++`` (without ``g++`` MLX runs the ops unfused) and caches the library in
``<tmp>/mlx/<version>/cpu/``, shared by every process of the machine. MLX checks whether
the library file exists and otherwise writes the source and runs the compiler in place,
with nothing to stop another process from doing the same at once: tensor-parallel ranks
starting together could load each other's half-written library. Every kernel build of
ours therefore runs under :func:`kernel_lock` (see ``prebuild.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
from collections.abc import Iterator

import mlx.core as mx

from vllm_ray_metal.compat import mlx as compat_mlx

logger = logging.getLogger(f"vllm.{__name__}")


@contextlib.contextmanager
def kernel_lock() -> Iterator[None]:
    """Hold an exclusive lock next to MLX's kernel cache (released if the holder dies).

    Not re-entrant: a process that takes it twice waits on itself.
    """
    root = compat_mlx.kernel_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".vllm-ray-metal-build.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache  # the rope and norm wrappers both ask; once a process is enough
def compiler_works() -> bool:
    """Whether a compiled function runs here.

    Without ``g++`` on the PATH MLX runs compiled functions unfused (still correct); this
    catches a compiler that is there but fails, so the wrappers are not installed then.
    """
    probe = mx.compile(lambda x: mx.sqrt(x * x + 1.0))
    try:
        with kernel_lock():
            mx.eval(probe(mx.ones((8,))))
        return True
    except Exception as exc:  # MLX raises RuntimeError when the build fails
        logger.warning("MLX cannot build fused CPU kernels (%s); RMSNorm and rope keep "
                       "their unfused ops", exc)
        return False
