"""SwiGLU's activation through numpy: the same MLP outputs as mlx-lm's, where it applies."""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama

from vllm_ray_metal import swiglu

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu,
                                reason="the numpy activation is installed on the CPU only")


def tiny_llama(**overrides) -> nn.Module:
    args = dict(model_type="llama", hidden_size=64, num_hidden_layers=2,
                intermediate_size=4096, num_attention_heads=4, num_key_value_heads=2,
                rms_norm_eps=1e-5, vocab_size=97, tie_word_embeddings=False)
    model = llama.Model(llama.ModelArgs(**{**args, **overrides}))
    mx.eval(model.parameters())
    return model


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
    calls = []
    real = swiglu.silu_mul
    monkeypatch.setattr(swiglu, "silu_mul", lambda g, u: calls.append(g.shape) or real(g, u))
    model, reference = tiny_llama(), tiny_llama()
    reference.update(model.parameters())
    assert swiglu.install(model) == 2
    assert all(isinstance(layer.mlp, swiglu.NumpySwiGLU) for layer in model.layers)
    tokens = mx.array(np.random.default_rng(1).integers(0, 97, (4, 8)), dtype=mx.int32)
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(reference(tokens)),
                               rtol=1e-4, atol=1e-4)
    # install's probe, then each layer: 32 tokens x 4096 wide take numpy's path
    assert calls == [(2, 4096)] + [(4, 8, 4096)] * 2
    one = tokens[:1, :1]  # below MIN_ELEMENTS: mlx-lm's own activation, bitwise
    assert mx.array_equal(model(one), reference(one)).item()
    assert len(calls) == 3


def test_other_dtypes_keep_mlx_activation():
    model, reference = tiny_llama(), tiny_llama()
    reference.update(model.parameters())
    swiglu.install(model)
    model.set_dtype(mx.bfloat16)
    reference.set_dtype(mx.bfloat16)
    tokens = mx.array(np.arange(32).reshape(4, 8), dtype=mx.int32)
    assert mx.array_equal(model(tokens), reference(tokens)).item()


def test_mlps_that_are_not_swiglu_are_left_alone():
    model = tiny_llama()
    for layer in model.layers:  # same projections, another activation (GELU)
        mlp = layer.mlp
        mlp.__class__ = type("GeluMLP", (type(mlp),), {
            "__call__": lambda self, x: self.down_proj(nn.gelu(self.gate_proj(x))
                                                       * self.up_proj(x))})
    assert swiglu.install(model) == 0
    assert not any(isinstance(layer.mlp, swiglu.NumpySwiGLU) for layer in model.layers)
