"""Which BLAS MLX's Linux CPU backend binds to, and how many threads it gets."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from vllm_ray_metal import blas

PROBE = """
import json, os
import numpy as np
from vllm_ray_metal import blas
import mlx.core as mx
rng = np.random.default_rng(0)
err, gemv = 0.0, []
# every layout MLX hands cblas_sgemm: plain, B transposed (x @ W.T), A transposed, and
# addmm's beta; one-row products (the shim's GEMV branch) and several rows (sgemm)
for rows in (1, 2, 64):
    a = rng.standard_normal((rows, 300)).astype(np.float32)
    b = rng.standard_normal((300, 200)).astype(np.float32)
    c = rng.standard_normal((rows, 200)).astype(np.float32)
    before = blas.gemv_products()
    got = [mx.array(a) @ mx.array(b), mx.array(a) @ mx.array(b.T.copy()).T,
           mx.array(a.T.copy()).T @ mx.array(b),
           mx.addmm(mx.array(c), mx.array(a), mx.array(b), alpha=0.5, beta=2.0)]
    want = [a @ b, a @ b, a @ b, 2.0 * c + 0.5 * (a @ b)]
    err = max([err] + [float(np.abs(np.asarray(g) - w).max()) for g, w in zip(got, want)])
    gemv.append(blas.gemv_products() - before)
print(json.dumps({"loaded": blas.loaded, "threads_set": blas.set_threads(1), "err": err,
                  "gemv": gemv}))
"""


def probe(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_RAY_METAL_")}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=120, env={**full, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS preloading is Linux-only")
def test_recipe_blas_is_openblas_behind_the_shim_and_multiplies_correctly():
    res = probe()
    assert res["loaded"] and "scipy_openblas" in res["loaded"], res
    assert res["threads_set"] is True
    assert res["err"] < 1e-3, res
    assert res["gemv"] == [4, 0, 0], res  # only one-row products take sgemv


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS preloading is Linux-only")
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the mkl wheel is x86_64-only")
def test_mkl_when_asked_and_correct():
    res = probe(VLLM_RAY_METAL_BLAS="mkl")
    assert res["loaded"] and "libmkl_rt" in res["loaded"], res
    assert res["threads_set"] is True and res["err"] < 1e-3, res
    assert res["gemv"] == [0, 0, 0], res  # no shim: MKL's own sgemm


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


def test_thread_share(monkeypatch):
    monkeypatch.delenv(blas.THREADS_ENV, raising=False)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv(blas.NODE_RANKS_ENV, "1")
    assert blas.default_threads() == cores
    monkeypatch.setenv(blas.NODE_RANKS_ENV, str(cores * 4))
    assert blas.default_threads() == 1  # never zero
    monkeypatch.setenv(blas.THREADS_ENV, "3")
    assert blas.default_threads() == 3


def test_spin_only_when_the_machine_has_a_core_per_thread(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv(blas.HOST_RANKS_ENV, "1")
    assert blas.spin_fits(cores)
    assert not blas.spin_fits(cores + 1)
    monkeypatch.setenv(blas.HOST_RANKS_ENV, "2")  # two loopback raylets of one machine
    assert not blas.spin_fits(cores)
    assert blas.spin_fits(max(1, cores // 2))


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
