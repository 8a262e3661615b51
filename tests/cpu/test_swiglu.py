"""SwiGLU's activation through numpy: the same MLP outputs as mlx-lm's, where it applies."""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from vllm_ray_metal.cpu import swiglu
from vllm_ray_metal.testing.models import mlx_llama

pytestmark = [pytest.mark.unit, pytest.mark.skipif(mx.default_device() != mx.cpu,
                                 reason="the numpy activation is installed on the CPU only")]


def tiny_llama(**overrides) -> nn.Module:
    return mlx_llama(**{"intermediate_size": 4096, **overrides})  # above MIN_ELEMENTS at 3 rows


def test_silu_mul_matches_mlx_including_extremes():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((16, 1536)).astype(np.float32) * 8
    g[0, :6] = [-1000.0, -89.0, -0.0, 0.0, 89.0, 1000.0]  # exp(-g) overflows for some
    u = rng.standard_normal((16, 1536)).astype(np.float32)
    gate, up = mx.array(g), mx.array(u)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow warning per step
        got = np.asarray(swiglu.silu_mul(gate, up))
    want = np.asarray(nn.silu(gate) * up)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_install_wraps_swiglu_mlps_and_keeps_outputs(monkeypatch):
    model, reference = tiny_llama(), tiny_llama()
    reference.update(model.parameters())
    assert swiglu.install(model) == 2
    assert all(isinstance(layer.mlp, swiglu.NumpySwiGLU) for layer in model.layers)
    calls = []
    real = swiglu.silu_mul
    monkeypatch.setattr(swiglu, "silu_mul", lambda g, u: calls.append(g.shape) or real(g, u))
    tokens = mx.array(np.random.default_rng(1).integers(0, 97, (4, 8)), dtype=mx.int32)
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(reference(tokens)),
                               rtol=1e-4, atol=1e-4)
    assert calls == [(4, 8, 4096)] * 2  # 32 tokens x 4096 wide: numpy's path, each layer
    one = tokens[:1, :1]  # below MIN_ELEMENTS: mlx-lm's own activation, bitwise
    assert mx.array_equal(model(one), reference(one)).item()
    assert len(calls) == 2


def test_other_dtypes_keep_mlx_activation(monkeypatch):
    model, reference = tiny_llama(), tiny_llama()
    reference.update(model.parameters())
    assert swiglu.install(model) == 2
    monkeypatch.setattr(swiglu, "silu_mul", lambda g, u: pytest.fail("numpy path for bf16"))
    model.set_dtype(mx.bfloat16)
    reference.set_dtype(mx.bfloat16)
    tokens = mx.array(np.arange(32).reshape(4, 8), dtype=mx.int32)
    assert mx.array_equal(model(tokens), reference(tokens)).item()


def _replace_activation(model: nn.Module, activation) -> None:
    """Same projections, another activation, in one MLP class for every layer."""
    base = type(model.layers[0].mlp)
    cls = type("OtherMLP", (base,), {"__call__": lambda self, x: self.down_proj(
        activation(self.gate_proj(x), self.up_proj(x)))})
    for layer in model.layers:
        layer.mlp.__class__ = cls


def test_mlps_that_are_not_swiglu_are_left_alone():
    model = tiny_llama()
    _replace_activation(model, lambda g, u: nn.gelu(g) * u)
    assert swiglu.install(model) == 0
    assert not any(isinstance(layer.mlp, swiglu.NumpySwiGLU) for layer in model.layers)


def test_clamped_swiglu_is_left_alone():
    """A limit the small probe never reaches is caught by the large one."""
    model = tiny_llama()
    _replace_activation(model, lambda g, u: nn.silu(mx.minimum(g, 7.0)) * mx.clip(u, -7, 7))
    assert swiglu.install(model) == 0


def test_each_layer_is_probed():
    model = tiny_llama()
    model.layers[1].mlp.__class__ = type("ClampedMLP", (type(model.layers[1].mlp),), {
        "__call__": lambda self, x: self.down_proj(
            nn.silu(mx.minimum(self.gate_proj(x), 7.0)) * self.up_proj(x))})
    assert swiglu.install(model) == 1
    assert isinstance(model.layers[0].mlp, swiglu.NumpySwiGLU)
    assert not isinstance(model.layers[1].mlp, swiglu.NumpySwiGLU)
