"""Which BLAS MLX's Linux CPU backend binds to, and how many threads it gets."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_ray_metal.cpu import blas

pytestmark = pytest.mark.unit

PROBE = """
import json, os
import numpy as np
from vllm_ray_metal import cpu
cpu.preload()  # as the worker module does, before MLX
from vllm_ray_metal.cpu import blas
import mlx.core as mx
rng = np.random.default_rng(0)
if "KERNEL" in os.environ:
    blas.use_kernel(os.environ["KERNEL"])
blas.set_threads(int(os.environ.get("THREADS", "2")))
err, ours = 0.0, {}
# every layout MLX hands cblas_sgemm: plain, B transposed (x @ W.T: the shim's kernel),
# A transposed, and addmm's beta with either B; row counts around the kernel's 2- and
# 4-row blocks and its row limit; k with and without a ragged tail, n with ragged blocks
for rows in (1, 2, 3, 5, 16, 17, 32, 33, 64):
    for k, n in ((300, 203), (576, 960)):
        a = rng.standard_normal((rows, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        c = rng.standard_normal((rows, n)).astype(np.float32)
        before = blas.kernel_products()
        bt = mx.array(b.T.copy()).T
        at = mx.array(a.T.copy()).T
        got = [mx.array(a) @ mx.array(b), mx.array(a) @ bt, at @ mx.array(b), at @ bt,
               mx.addmm(mx.array(c), mx.array(a), mx.array(b), alpha=0.5, beta=2.0),
               mx.addmm(mx.array(c), mx.array(a), bt, alpha=0.5, beta=2.0)]
        want = [a @ b] * 4 + [2.0 * c + 0.5 * (a @ b)] * 2
        err = max([err] + [float(np.abs(np.asarray(g) - w).max()) for g, w in zip(got, want)])
        ours[rows] = ours.get(rows, 0) + blas.kernel_products() - before
print(json.dumps({"loaded": blas.loaded, "threads_set": blas.set_threads(1), "err": err,
                  "kernel": blas.kernel(), "ours": ours}))
"""


def probe(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_RAY_METAL_")}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=120, env={**full, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_kernels() -> list[str]:
    """The shim kernels this CPU can run (the best is used by default)."""
    flags = open("/proc/cpuinfo").read().split()
    if "avx2" not in flags or "fma" not in flags:
        return ["none"]
    return ["none", "avx2"] + (["avx512"] if {"avx512f", "avx512vl"} <= set(flags) else [])


KERNEL_ROWS = {"none": 0, "avx2": 16, "avx512": 32}  # the shim's row limit per kernel


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS preloading is Linux-only")
@pytest.mark.parametrize("threads", ["1", "2"])
def test_recipe_blas_is_openblas_behind_the_shim_and_multiplies_correctly(threads):
    for kernel in cpu_kernels():
        res = probe(KERNEL=kernel, THREADS=threads)
        assert res["loaded"] and "scipy_openblas" in res["loaded"], res
        assert res["kernel"] == kernel and res["threads_set"] is True, res
        assert res["err"] < 1e-3, res
        # only x @ W.T products (plain and in addmm) of up to the limit's rows take our
        # kernel: 2 layouts x 2 shapes, and at one row also A stored as a column (MLX
        # passes the stacked last hidden states of single-sequence decode that way)
        want = {str(r): (6 if r == 1 else 4) if r <= KERNEL_ROWS[kernel] else 0
                for r in (1, 2, 3, 5, 16, 17, 32, 33, 64)}
        assert res["ours"] == want, res


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS preloading is Linux-only")
def test_kernel_env_switches_the_kernel_off():
    res = probe(VLLM_RAY_METAL_BLAS_KERNEL="none")
    assert res["kernel"] == "none" and res["err"] < 1e-3, res
    assert set(res["ours"].values()) == {0}, res


FORK = """
import ctypes, os
import numpy as np
from vllm_ray_metal.cpu import blas
blas.preload()
import mlx.core as mx
blas.set_threads(2)
rng = np.random.default_rng(0)
a = rng.standard_normal((4, 512)).astype(np.float32)
w = rng.standard_normal((1024, 512)).astype(np.float32)
assert np.abs(np.asarray(mx.array(a) @ mx.array(w).T) - a @ w.T).max() < 1e-3
# the kernel's helper threads are running now. MLX's own stream thread does not survive
# fork(), so the child calls the shim directly, as MLX would: C = A W^T
pid = os.fork()
if pid == 0:
    c = np.zeros((4, 1024), np.float32)
    f = ctypes.c_float
    ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)
    blas._shim.cblas_sgemm(101, 111, 112, 4, 1024, 512, f(1.0), ptr(a), 512, ptr(w), 512,
                           f(0.0), ptr(c), 1024)
    os._exit(0 if np.abs(c - a @ w.T).max() < 1e-3 and blas.kernel_products() == 2 else 1)
_, status = os.waitpid(pid, 0)
print("child", os.WEXITSTATUS(status))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS preloading is Linux-only")
def test_kernel_threads_survive_fork():
    if cpu_kernels() == ["none"]:
        pytest.skip("this CPU has no AVX2: the shim's kernel is off")
    out = subprocess.run([sys.executable, "-c", FORK], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["child", "0"], out.stdout  # right, on the kernel, no hang


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS preloading is Linux-only")
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the mkl wheel is x86_64-only")
def test_mkl_when_asked_and_correct():
    res = probe(VLLM_RAY_METAL_BLAS="mkl")
    assert res["loaded"] and "libmkl_rt" in res["loaded"], res
    assert res["threads_set"] is True and res["err"] < 1e-3, res
    assert set(res["ours"].values()) == {0}, res  # no shim: MKL's own sgemm


def test_no_compiler_means_no_shim(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert blas.build_shim(tmp_path) is None
    assert not list((tmp_path / "blas").glob("*.so"))  # no half-written library left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS preloading is Linux-only")
def test_opt_outs_load_nothing():
    assert probe(VLLM_RAY_METAL_BLAS="none")["loaded"] is None
    # a stock vLLM process (our platform off) keeps its own libraries
    res = probe(VLLM_RAY_METAL_DISABLE="1")
    assert res["loaded"] is None and res["threads_set"] is False
    # the CPU-tuning switch: MLX keeps its bundled BLAS (what runs where no tuning applies)
    res = probe(VLLM_RAY_METAL_CPU_TUNING="0")
    assert res["loaded"] is None and res["threads_set"] is False
    assert "scipy_openblas" in probe(VLLM_RAY_METAL_CPU_TUNING="blas")["loaded"]


def test_thread_share(monkeypatch):
    monkeypatch.delenv("VLLM_RAY_METAL_BLAS_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert blas.default_threads(ranks_on_node=1) == cores
    assert blas.default_threads(ranks_on_node=cores * 4) == 1  # never zero
    monkeypatch.setenv("VLLM_RAY_METAL_BLAS_THREADS", "3")
    assert blas.default_threads(ranks_on_node=cores * 4) == 3


def test_spin_only_when_the_machine_has_a_core_per_thread():
    cores = len(os.sched_getaffinity(0))
    assert blas.spin_fits(cores, ranks_on_host=1)
    assert not blas.spin_fits(cores + 1, ranks_on_host=1)
    assert not blas.spin_fits(cores, ranks_on_host=2)  # two loopback raylets of one machine
    assert blas.spin_fits(max(1, cores // 2), ranks_on_host=2)


BUILD = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from vllm_ray_metal.cpu import blas
print("BUILT", blas.build_shim(Path(sys.argv[1])))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shim is Linux-only")
def test_racing_builders_make_one_library_and_one_says_so(tmp_path):
    """Workers starting together on a fresh machine: one compiles (and logs it), the other
    waits on the lock and loads the same file."""
    if blas.compiler() is None:
        pytest.skip("no C compiler here: the shim cannot be built (MKL is used)")
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    built = {line.split()[1] for out, _ in outs for line in out.splitlines()
             if line.startswith("BUILT")}
    assert len(built) == 1 and built != {"None"}, outs
    assert sum("Building the BLAS shim" in err for _, err in outs) == 1, outs
    assert [p.name for p in (tmp_path / "blas").glob("*.so")] == [Path(built.pop()).name]


def test_set_spin_writes_kmp_blocktime_unless_the_user_did(monkeypatch):
    monkeypatch.setattr(blas, "_user_blocktime", None)
    monkeypatch.setenv(blas.BLOCKTIME_ENV, "x")
    blas.set_spin(True)
    assert os.environ[blas.BLOCKTIME_ENV] == "200"
    blas.set_spin(False)
    assert os.environ[blas.BLOCKTIME_ENV] == "0"
    monkeypatch.setattr(blas, "_user_blocktime", "7")
    monkeypatch.setenv(blas.BLOCKTIME_ENV, "7")
    blas.set_spin(False)
    assert os.environ[blas.BLOCKTIME_ENV] == "7"
