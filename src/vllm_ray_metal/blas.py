"""Give MLX's Linux CPU backend a real BLAS, with an explicit thread count.

The Linux ``mlx[cpu]`` wheel resolves ``cblas_sgemm`` dynamically and ships a reference
BLAS (~3.6 GFLOP/s for a 1024² fp32 matmul here). Loading an optimised library into the
global symbol scope *before* ``mlx.core`` is imported makes MLX bind to it instead. In
order of preference:

* Intel MKL from this Python environment (the ``mkl`` wheel, installed by the project's
  recipe on x86_64 Linux): for SmolLM2's decoder at 16 and 32 sequences per step it took
  about half the CPU time of OpenBLAS 0.3.21 here (156-239 ms vs 278-699 ms per step,
  best of 8, in one A/B run on a loaded machine);
* Debian's / Fedora's pthreads OpenBLAS (``apt-get install libopenblas0-pthread``).

``VLLM_RAY_METAL_BLAS=none`` keeps MLX's own, a path chooses a library. Nothing is loaded
when the platform is switched off (``VLLM_RAY_METAL_DISABLE``), so a stock vLLM process
keeps its own libraries. macOS uses Accelerate through MLX's own build: nothing to do.

Threads: Ray starts actors with ``OMP_NUM_THREADS=1``, which both libraries obey, so a
worker would run its matrix products on one core. :func:`set_threads` sets the count
explicitly (the worker gives each of its node's ranks an equal share of the cores), and
:func:`set_spin` decides whether MKL's threads spin between products.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

BLAS_ENV = "VLLM_RAY_METAL_BLAS"
THREADS_ENV = "VLLM_RAY_METAL_BLAS_THREADS"
NODE_RANKS_ENV = "VLLM_RAY_METAL_NODE_RANKS"  # set by the executor: its ranks on this node
HOST_RANKS_ENV = "VLLM_RAY_METAL_HOST_RANKS"  # set by the executor: MLX ranks on this machine
BLOCKTIME_ENV = "KMP_BLOCKTIME"  # Intel OpenMP (MKL's threads): ms to spin after a product
OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",  # Debian/Ubuntu
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",  # Fedora/RHEL (pthreads build)
)

loaded: str | None = None
_user_blocktime = os.environ.get(BLOCKTIME_ENV)  # before set_spin writes it
_lib: ctypes.CDLL | None = None


def _mkl_candidates() -> list[str]:
    """libmkl_rt from the ``mkl`` wheel in this environment (installed into <prefix>/lib)."""
    return sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so.*")), reverse=True)


def _open(path: str) -> ctypes.CDLL:
    if "libmkl_rt" in os.path.basename(path):
        # MKL's default (Intel) threading layer dlopen()s libiomp5 by name; load the copy
        # shipped next to it first so the lookup succeeds without LD_LIBRARY_PATH.
        iomp = os.path.join(os.path.dirname(path), "libiomp5.so")
        if os.path.exists(iomp):
            ctypes.CDLL(iomp, mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def preload() -> str | None:
    """Load the preferred BLAS with RTLD_GLOBAL; return its path (or None)."""
    global loaded, _lib
    if loaded or not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return loaded
    if os.environ.get("VLLM_RAY_METAL_DISABLE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return None
    choice = os.environ.get(BLAS_ENV, "").strip()
    if choice.lower() == "none":
        return None
    for path in ([choice] if choice else [*_mkl_candidates(), *OPENBLAS]):
        if os.path.exists(path):
            try:
                _lib = _open(path)
            except OSError:
                continue
            loaded = path
            break
    return loaded


def set_threads(count: int) -> bool:
    """Set the loaded library's thread count; False if no known library is loaded."""
    if _lib is None or count < 1:
        return False
    for name in ("MKL_Set_Num_Threads", "openblas_set_num_threads"):
        fn = getattr(_lib, name, None)
        if fn is not None:
            fn(ctypes.c_int(count))
            return True
    return False


def set_spin(enabled: bool) -> None:
    """Let MKL's OpenMP threads spin between products (its default) or sleep at once.

    Spinning (Intel OpenMP's default 200 ms) keeps the threads hot across the hundreds of
    small products of a decode step: measured here with SmolLM2, one sequence went from
    15.9 to 22.2 tok/s end to end, and MLX's CPU attention no longer slows ~6x from 128
    keys on (each of its small products otherwise woke a sleeping thread). But a spinning
    thread holds its core, so when several MLX ranks share one machine's cores it stalls
    the others; then the threads sleep at once (``KMP_BLOCKTIME=0``). Intel OpenMP reads
    the variable when its first parallel region starts, so this must run before the
    process's first matrix product; a value the user set is kept.
    """
    if _user_blocktime is None:
        os.environ[BLOCKTIME_ENV] = "200" if enabled else "0"


def spin_fits(threads: int) -> bool:
    """True if every MLX rank on this machine can keep ``threads`` cores busy at once."""
    host_ranks = int(os.environ.get(HOST_RANKS_ENV, "1") or 1)
    return host_ranks * threads <= _cores()


def configure() -> int:
    """Spinning and thread count for this process's MLX products; the threads set (0: none).

    Call before the process's first matrix product (see :func:`set_spin`).
    """
    threads = default_threads()
    set_spin(spin_fits(threads))
    return threads if set_threads(threads) else 0


def _cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def default_threads() -> int:
    """``VLLM_RAY_METAL_BLAS_THREADS``, else this process's cores split among the node's ranks."""
    ranks_on_node = int(os.environ.get(NODE_RANKS_ENV, "1") or 1)
    explicit = os.environ.get(THREADS_ENV, "").strip()
    if explicit:
        return max(1, int(explicit))
    return max(1, _cores() // max(1, ranks_on_node))
