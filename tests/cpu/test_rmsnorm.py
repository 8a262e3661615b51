"""Compiled RMSNorm: bitwise the same as mx.fast.rms_norm, only where it applies."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from vllm_ray_metal.cpu import rmsnorm
from vllm_ray_metal.testing.models import mlx_llama

pytestmark = [pytest.mark.unit, pytest.mark.skipif(mx.default_device() != mx.cpu,
                                 reason="the compiled norm is installed on the CPU only")]


def tiny_llama() -> nn.Module:
    return mlx_llama(norm_weights_seed=0)  # non-trivial norm weights


def test_install_keeps_weights_names_and_outputs_bitwise():
    model, reference = tiny_llama(), tiny_llama()
    reference.update(model.parameters())
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert rmsnorm.install(model) == 5  # two a layer and the final norm
    assert isinstance(model.model.norm, rmsnorm.CompiledRMSNorm)
    assert [k for k, _ in tree_flatten(model.parameters())] == names
    assert rmsnorm.install(model) == 0  # idempotent
    rng = np.random.default_rng(1)
    for shape in ((1, 1), (3, 1), (2, 9)):  # shapeless: one trace serves every shape
        tokens = mx.array(rng.integers(0, 97, shape), dtype=mx.int32)
        assert mx.array_equal(model(tokens), reference(tokens)).item()


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_norm_is_bitwise(dtype):
    norm = nn.RMSNorm(64, eps=1e-6)
    norm.weight = mx.array(np.linspace(0.5, 1.5, 64, dtype=np.float32)).astype(dtype)
    x = (mx.random.normal((4, 3, 64), key=mx.random.key(2)) * 30).astype(dtype)
    assert mx.array_equal(rmsnorm.CompiledRMSNorm(norm)(x), norm(x)).item()


def test_other_norms_are_left_alone():
    class OnePlusRMSNorm(nn.RMSNorm):  # Gemma-style: scales by 1 + weight
        def __call__(self, x):
            return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)

    block = nn.Module()
    block.a, block.b, block.c = OnePlusRMSNorm(8), nn.LayerNorm(8), nn.RMSNorm(8)
    assert rmsnorm.install(block) == 1
    assert type(block.a) is OnePlusRMSNorm and type(block.b) is nn.LayerNorm
    assert type(block.c) is rmsnorm.CompiledRMSNorm


def test_one_trace_serves_other_shapes_and_widths():
    """Shapeless: traced on a decode row first (as in serving), then reused for other
    shapes and for another width with the same eps (the divisor is read at run time)."""
    eps = 3.25e-6  # not used elsewhere: this test makes the first trace
    rng = np.random.default_rng(4)
    for shape in ((1, 1, 64), (3, 7, 64), (2, 5, 4, 32), (1, 1, 96)):
        norm = nn.RMSNorm(shape[-1], eps=eps)
        norm.weight = mx.array(rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32))
        x = mx.array(rng.standard_normal(shape).astype(np.float32) * 4)
        assert mx.array_equal(rmsnorm.CompiledRMSNorm(norm)(x), norm(x)).item(), shape
