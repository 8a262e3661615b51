"""Building MLX's fused CPU kernels: pre-building covers real steps; no g++, no build."""

from __future__ import annotations

import mlx.core as mx
import pytest

from vllm_ray_metal.testing import scenarios

pytestmark = [pytest.mark.unit, pytest.mark.skipif(mx.default_device() != mx.cpu,
                                 reason="fused CPU kernels are built on the CPU only")]

SCRIPT = r"""
import glob, json, os
import mlx.core as mx
import sys
from vllm_ray_metal.compat import mlx as compat_mlx
from vllm_ray_metal.cpu import prebuild, rmsnorm, rope
from vllm_ray_metal.engine.kv_cache import PagedKVPool, build_layout
from vllm_ray_metal.testing.models import mlx_llama
from vllm_ray_metal.testing.scenarios import report

family, kv_heads = sys.argv[1], int(sys.argv[2])
model = mlx_llama(family, num_key_value_heads=kv_heads)
result = {"ropes": rope.install(model), "norms": rmsnorm.install(model),
          "compiled_ropes": sum(l.self_attn.rope.compiled for l in model.layers)}

def libraries():  # MLX's kernel cache, where compat.mlx says it is (TMPDIR is ours)
    root = compat_mlx.kernel_cache_dir()
    assert str(root).startswith(os.environ["TMPDIR"])
    return sorted(os.path.basename(p) for p in glob.glob(str(root / "*" / "cpu" / "*.so")))

result["before"] = libraries()  # the compiler probe's
result["calls"] = prebuild.prebuild(model, mx.float32)
result["prebuilt"] = libraries()
pool = PagedKVPool(2, 16, 4, kv_heads, 16, mx.float32)
steps = [([0], [5], [[1, 2]]), ([0, 0], [3, 2], [[3], [4]]),  # prefill chunks
         ([5], [1], [[1, 2]]), ([3, 2], [1, 1], [[3], [4]]),  # decode: 1 row, 2 rows
         ([6, 4, 3], [1, 1, 1], [[1, 2], [3, 5], [4]])]        # 3 rows
for starts, lengths, tables in steps:
    layout = build_layout(starts, lengths, tables, 4)
    tokens = mx.zeros((len(starts), max(lengths)), dtype=mx.int32)
    mx.eval(model.model(tokens, cache=pool.layer_caches(layout)))
result["after_steps"] = libraries()
report(result)
"""


def run(tmp_path, family: str = "llama", kv_heads: int = 2,
        path: str | None = None) -> dict:
    env = {"TMPDIR": str(tmp_path)}  # a kernel cache of its own
    if path is not None:
        env["PATH"] = path
    return scenarios.run_python(["-c", SCRIPT, family, str(kv_heads)], env, timeout=300).result


@pytest.mark.parametrize("family, kv_heads, norms", [
    ("llama", 2, 5),  # two a layer and the final norm
    ("llama", 1, 5),  # one KV head: keys are contiguous, another kernel layout
    ("qwen3", 2, 9),  # + q_norm and k_norm a layer
])
def test_prebuild_builds_every_kernel_real_steps_use(tmp_path, family, kv_heads, norms):
    got = run(tmp_path, family, kv_heads)
    assert got["norms"] == norms and got["ropes"] == 2 and got["compiled_ropes"] == 2
    assert got["calls"] > 0 and set(got["prebuilt"]) > set(got["before"])  # it built some
    assert got["after_steps"] == got["prebuilt"]  # ...and real steps build nothing new


def test_without_a_compiler_the_model_runs_unfused(tmp_path):
    got = run(tmp_path, path=str(tmp_path / "no-compiler-here"))  # no g++ on the PATH
    assert got["norms"] == 5 and got["compiled_ropes"] == 2  # installed, harmless:
    assert got["prebuilt"] == [] and got["after_steps"] == []  # MLX runs them unfused
