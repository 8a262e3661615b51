"""Give MLX's Linux CPU backend a real BLAS, with an explicit thread count.

The Linux ``mlx[cpu]`` wheel resolves ``cblas_sgemm`` dynamically and ships a slow
reference BLAS. Loading an optimised library into the global symbol scope *before*
``mlx.core`` is imported makes MLX bind to it instead. In order of preference:

* OpenBLAS from the ``scipy-openblas32`` wheel behind a small ``cblas_sgemm`` shim
  (``sgemm_shim.c``): the wheel only exports ``scipy_``-prefixed names, and the shim runs
  products of a few rows (decode steps) in its own kernel, which streams the weights once
  instead of packing them. The shim is compiled once per machine into the user cache, by
  ``vllm-ray-metal build-blas`` or by the first worker that needs it (under a file lock);
* Intel MKL from this Python environment (the ``mkl`` wheel), when no compiler is found;
* Debian's / Fedora's pthreads OpenBLAS (``apt-get install libopenblas0-pthread``).

Threads: Ray starts actors with ``OMP_NUM_THREADS=1``, which these libraries obey, so
:func:`configure` sets the count explicitly (each rank on a node gets an equal share of
its cores) and decides whether MKL's threads spin between products. OpenBLAS's idle
threads are told to sleep at once (``OPENBLAS_THREAD_TIMEOUT``): spinning, they held a
core the kernel's threads needed. macOS uses Accelerate through MLX's own build.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vllm_ray_metal import envs

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers

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
missed_mlx = False  # preload came after this process imported mlx.core
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


def preload(build: bool = True) -> str | None:
    """Load the preferred BLAS with RTLD_GLOBAL; return its path (or None).

    Must run before this process imports ``mlx.core``; afterwards it loads nothing (and
    :data:`missed_mlx` says so). ``build``: compile the shim first if this machine has a
    compiler and no build of it yet; else an unbuilt shim means the next library.
    """
    global loaded, _lib, missed_mlx
    if loaded or not sys.platform.startswith("linux"):
        return loaded
    choice = envs.VLLM_RAY_METAL_BLAS
    if choice.lower() == "none":
        return None
    if "mlx.core" in sys.modules:
        missed_mlx = True
        return None
    if not choice and _load_openblas_shim(build):
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


def shim_target(cache: Path | None = None) -> Path:
    """Where this source's build of the shim lives (named by the source's hash)."""
    digest = hashlib.sha1(SHIM_SOURCE.read_bytes()).hexdigest()[:12]
    return (cache or envs.cache_root()) / "blas" / f"libvrm_sgemm-{digest}.so"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_shim(cache: Path | None = None) -> Path | None:
    """Compile ``sgemm_shim.c`` once into the user cache; None without a C compiler.

    Processes that race here take turns on a file lock; the first builds, the others
    find its result.
    """
    target = shim_target(cache)
    if target.exists():
        return target
    cc = compiler()
    if cc is None:
        return None
    out_dir = target.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir / ".build.lock"):
        if target.exists():
            return target
        logger.info("Building the BLAS shim for MLX's CPU backend (%s, once per machine; "
                    "`vllm-ray-metal build-blas` does it ahead of time)", target)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            done = subprocess.run([cc, "-O3", "-pthread", "-shared", "-fPIC", "-o", tmp,
                                   str(SHIM_SOURCE)], capture_output=True, timeout=120)
            if done.returncode != 0:
                logger.warning("Could not build the BLAS shim with %s: %s", cc,
                               done.stderr.decode(errors="replace")[-500:])
                return None
            os.replace(tmp, target)
            for old in out_dir.glob("libvrm_sgemm-*.so"):  # builds of earlier sources
                if old != target:
                    old.unlink(missing_ok=True)
        except (OSError, subprocess.SubprocessError) as exc:
            logger.warning("Could not build the BLAS shim with %s: %s", cc, exc)
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released if the holder dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_openblas_shim(build: bool = True) -> bool:
    """Load OpenBLAS (scipy-openblas32) behind the shim; True if MLX will use it."""
    global loaded, _lib, _shim
    library = _openblas32()
    if library is None:
        return False
    shim_path = build_shim() if build else shim_target()
    if shim_path is None or not shim_path.exists():
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
    if envs.VLLM_RAY_METAL_BLAS_KERNEL:
        use_kernel(envs.VLLM_RAY_METAL_BLAS_KERNEL)
    return True


def kernel_products() -> int:
    """How many products the shim's own kernel ran in this process (0 without the shim)."""
    return 0 if _shim is None else int(_shim.vrm_kernel_products())


def use_kernel(limit: str = "avx512") -> str | None:
    """Cap the shim's kernel (``none``, ``avx2``, ``avx512``); the one now in use, or None
    without the shim. The best one the CPU runs is chosen at load; tests pick each."""
    if limit not in KERNELS:
        raise ValueError(f"VLLM_RAY_METAL_BLAS_KERNEL={limit!r}: use one of {', '.join(KERNELS)}")
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
    small products of a decode step (each product otherwise wakes a sleeping thread). But
    a spinning thread holds its core, so when several MLX ranks share one machine's cores
    it stalls the others; then the threads sleep at once (``KMP_BLOCKTIME=0``). Intel OpenMP reads
    the variable when its first parallel region starts, so this must run before the
    process's first matrix product; a value the user set is kept.
    """
    if _user_blocktime is None:
        os.environ[BLOCKTIME_ENV] = "200" if enabled else "0"


def spin_fits(threads: int, ranks_on_host: int) -> bool:
    """True if every MLX rank on this machine can keep ``threads`` cores busy at once."""
    return ranks_on_host * threads <= _cores()


def configure(ranks_on_node: int = 1, ranks_on_host: int = 1) -> int:
    """Spinning and thread count for this process's MLX products; the threads set (0: none).

    Call before the process's first matrix product (see :func:`set_spin`).
    """
    threads = default_threads(ranks_on_node)
    set_spin(spin_fits(threads, ranks_on_host))
    return threads if set_threads(threads) else 0


def _cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def default_threads(ranks_on_node: int = 1) -> int:
    """``VLLM_RAY_METAL_BLAS_THREADS``, else this process's cores split among the node's ranks."""
    explicit = envs.VLLM_RAY_METAL_BLAS_THREADS
    if explicit:
        return explicit
    return max(1, _cores() // max(1, ranks_on_node))
