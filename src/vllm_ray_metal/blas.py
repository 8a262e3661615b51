"""Give MLX's Linux CPU backend a real BLAS.

The Linux ``mlx[cpu]`` wheel resolves ``cblas_sgemm`` dynamically and ships a reference
BLAS (~3.6 GFLOP/s for a 1024² fp32 matmul here). Loading an optimised OpenBLAS into the
global symbol scope *before* ``mlx.core`` is imported makes MLX bind to it instead
(~25-130 GFLOP/s on the same machine). The package imports this first; set
``VLLM_RAY_METAL_BLAS=none`` to keep MLX's own, or a path to choose a library. macOS
uses Accelerate through Metal/MLX's own build, so this does nothing there.
"""

from __future__ import annotations

import ctypes
import os
import sys

BLAS_ENV = "VLLM_RAY_METAL_BLAS"
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",  # Debian/Ubuntu
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",  # Fedora/RHEL (pthreads build)
)

loaded: str | None = None


def preload() -> str | None:
    """Load the first available OpenBLAS with RTLD_GLOBAL; return its path (or None)."""
    global loaded
    if loaded or not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return loaded
    choice = os.environ.get(BLAS_ENV, "").strip()
    if choice.lower() == "none":
        return None
    for path in ([choice] if choice else CANDIDATES):
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            break
    return loaded
