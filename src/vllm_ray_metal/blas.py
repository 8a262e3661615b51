"""Give MLX's Linux CPU backend a real BLAS, with an explicit thread count.

The Linux ``mlx[cpu]`` wheel resolves ``cblas_sgemm`` dynamically and ships a reference
BLAS (~3.6 GFLOP/s for a 1024² fp32 matmul here). Loading an optimised library into the
global symbol scope *before* ``mlx.core`` is imported makes MLX bind to it instead. In
order of preference:

* OpenBLAS from the ``scipy-openblas32`` wheel behind a small ``cblas_sgemm`` shim
  (``sgemm_shim.c``, built once with the system C compiler into the user cache): the
  wheel only exports ``scipy_``-prefixed names, and the shim runs products of a few rows
  (decode steps) in its own kernel, which streams the weights once instead of packing
  them. Raw SmolLM2 fp32 decode step, median: MKL 63.7 ms at 1 row and 114 at 16;
  OpenBLAS (one-row products as sgemv) 41.6 and 98; see ``sgemm_shim.c`` and
  ``benchmarks/bench_blas.py`` for the kernel's own figures;
* Intel MKL from this Python environment (the ``mkl`` wheel), when no compiler is found;
* Debian's / Fedora's pthreads OpenBLAS (``apt-get install libopenblas0-pthread``).

``VLLM_RAY_METAL_BLAS=none`` keeps MLX's own, ``mkl`` skips the shim, a path chooses a
library; ``VLLM_RAY_METAL_BLAS_KERNEL=none|avx2|avx512`` caps the shim's own kernel
(``none``: OpenBLAS does every product). Nothing is loaded when the platform is switched
off (``VLLM_RAY_METAL_DISABLE``), so a stock vLLM process keeps its own libraries. macOS
uses Accelerate through MLX's own build: nothing to do.

Threads: Ray starts actors with ``OMP_NUM_THREADS=1``, which these libraries obey, so a
worker would run its matrix products on one core. :func:`set_threads` sets the count
explicitly (the worker gives each of its node's ranks an equal share of the cores; the
shim's kernel uses as many as OpenBLAS is set to), and :func:`set_spin` decides whether
MKL's threads spin between products. OpenBLAS's idle threads are told to sleep at once
(``OPENBLAS_THREAD_TIMEOUT``): spinning, they held a core the kernel's threads needed.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BLAS_ENV = "VLLM_RAY_METAL_BLAS"
THREADS_ENV = "VLLM_RAY_METAL_BLAS_THREADS"
KERNEL_ENV = "VLLM_RAY_METAL_BLAS_KERNEL"
NODE_RANKS_ENV = "VLLM_RAY_METAL_NODE_RANKS"  # set by the executor: its ranks on this node
HOST_RANKS_ENV = "VLLM_RAY_METAL_HOST_RANKS"  # set by the executor: MLX ranks on this machine
THREAD_TIMEOUT_ENV = "OPENBLAS_THREAD_TIMEOUT"  # log2 of the cycles its idle threads spin
BLOCKTIME_ENV = "KMP_BLOCKTIME"  # Intel OpenMP (MKL's threads): ms to spin after a product
OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",  # Debian/Ubuntu
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",  # Fedora/RHEL (pthreads build)
)

SHIM_SOURCE = Path(__file__).with_name("sgemm_shim.c")
KERNELS = {"none": 0, "avx2": 1, "avx512": 2}  # the shim's KERNEL_* values

loaded: str | None = None
_shim: ctypes.CDLL | None = None
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
    if not choice and _load_openblas_shim():
        return loaded
    if choice.lower() == "mkl":
        choice = ""
    for path in ([choice] if choice else [*_mkl_candidates(), *OPENBLAS]):
        if os.path.exists(path):
            try:
                _lib = _open(path)
            except OSError:
                continue
            loaded = path
            break
    return loaded


def _openblas32() -> str | None:
    """Path of the scipy-openblas32 wheel's library, if that wheel is installed."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    path = os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so")
    return path if os.path.exists(path) else None


def build_shim(cache: Path | None = None) -> Path | None:
    """Compile ``sgemm_shim.c`` once into the user cache; None without a C compiler."""
    from vllm_ray_metal.default_model import cache_root  # stdlib-only module, no MLX

    source = SHIM_SOURCE.read_bytes()
    out_dir = (cache or cache_root()) / "blas"
    target = out_dir / f"libvrm_sgemm-{hashlib.sha1(source).hexdigest()[:12]}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # processes may race: build
    os.close(fd)                                           # apart, rename atomically
    try:
        done = subprocess.run([compiler, "-O3", "-pthread", "-shared", "-fPIC", "-o", tmp,
                               str(SHIM_SOURCE)], capture_output=True, timeout=120)
        if done.returncode != 0:
            return None
        os.replace(tmp, target)
        for old in out_dir.glob("libvrm_sgemm-*.so"):  # builds of earlier sources
            if old != target:
                old.unlink(missing_ok=True)
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load_openblas_shim() -> bool:
    """Load OpenBLAS (scipy-openblas32) behind the shim; True if MLX will use it."""
    global loaded, _lib, _shim
    library = _openblas32()
    shim_path = build_shim() if library else None
    if shim_path is None:
        return False
    # OpenBLAS's idle threads busy-wait ~2^28 cycles (~0.1 s) after each threaded call; they
    # would hold a core the shim's kernel threads and MLX need. 2^4 cycles: sleep at once.
    os.environ.setdefault(THREAD_TIMEOUT_ENV, "4")  # read when the library loads
    try:
        openblas = ctypes.CDLL(library)  # local scope: only the shim calls it
        shim = ctypes.CDLL(str(shim_path), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    addr = ctypes.c_void_p
    shim.vrm_bind(ctypes.cast(openblas.scipy_cblas_sgemm, addr),
                  ctypes.cast(openblas.scipy_cblas_sgemv, addr),
                  ctypes.cast(openblas.scipy_openblas_get_num_threads, addr))
    shim.vrm_kernel_products.restype = ctypes.c_long
    _lib, _shim, loaded = openblas, shim, library
    if os.environ.get(KERNEL_ENV, "").strip():
        use_kernel(os.environ[KERNEL_ENV].strip().lower())
    return True


def kernel_products() -> int:
    """How many products the shim's own kernel ran in this process (0 without the shim)."""
    return 0 if _shim is None else int(_shim.vrm_kernel_products())


def use_kernel(limit: str = "avx512") -> str | None:
    """Cap the shim's kernel (``none``, ``avx2``, ``avx512``); the one now in use, or None
    without the shim. The best one the CPU runs is chosen at load; tests pick each."""
    if limit not in KERNELS:
        raise ValueError(f"{KERNEL_ENV}={limit!r}: use one of {', '.join(KERNELS)}")
    if _shim is None:
        return None
    _shim.vrm_use_kernel(ctypes.c_int(KERNELS[limit]))
    return kernel()


def kernel() -> str | None:
    """The shim's kernel in use (``none``, ``avx2``, ``avx512``), or None without the shim."""
    if _shim is None:
        return None
    current = _shim.vrm_kernel()
    return next(name for name, value in KERNELS.items() if value == current)


def set_threads(count: int) -> bool:
    """Set the loaded library's thread count; False if no known library is loaded."""
    if _lib is None or count < 1:
        return False
    for name in ("MKL_Set_Num_Threads", "scipy_openblas_set_num_threads",
                 "openblas_set_num_threads"):
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
