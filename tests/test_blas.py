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
a = np.random.default_rng(0).standard_normal((64, 300)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((300, 200)).astype(np.float32)
err = float(np.abs(np.asarray(mx.array(a) @ mx.array(b)) - a @ b).max())
print(json.dumps({"loaded": blas.loaded, "threads_set": blas.set_threads(1), "err": err}))
"""


def probe(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_RAY_METAL_")}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=120, env={**full, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS preloading is Linux-only")
def test_recipe_blas_is_loaded_and_multiplies_correctly():
    res = probe()
    expected = "libmkl_rt" if platform.machine() == "x86_64" else "openblas"
    assert res["loaded"] and expected in res["loaded"], res
    assert res["threads_set"] is True
    assert res["err"] < 1e-3, res


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
