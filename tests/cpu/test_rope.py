"""Per-step rope tables against the model's own rope modules: bitwise the same."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.rope_utils import initialize_rope

from vllm_ray_metal.cpu import rope
from vllm_ray_metal.engine import model_loader
from vllm_ray_metal.engine.kv_cache import PagedKVPool, build_layout

pytestmark = [pytest.mark.unit, pytest.mark.skipif(mx.default_device() != mx.cpu,
                                 reason="the tables replace mx.fast.rope on the CPU only")]

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("make", [
    lambda: nn.RoPE(64, traditional=False, base=10000.0),
    lambda: nn.RoPE(64, traditional=True, base=10000.0),
    lambda: nn.RoPE(32, traditional=False, base=500000.0),  # partial rotary dims
    lambda: nn.RoPE(32, traditional=True, base=10000.0, scale=0.5),
    lambda: initialize_rope(64, 500000.0, False, LLAMA3, max_position_embeddings=131072),
], ids=["half", "traditional", "partial", "partial-traditional-scaled", "llama3"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "compiled"])
def test_tables_equal_fast_rope(make, dtype, compiled):
    inner = make()
    wrapped = rope.TableRoPE(inner, rope.StepTables(), compiled)
    rng = np.random.default_rng(0)
    offsets = mx.array([0, 5, 130, 2047], dtype=mx.int32)
    for length in (1, 7):
        x = mx.array(rng.standard_normal((4, 3, length, 64)).astype(np.float32)).astype(dtype)
        expected = inner(x, offset=offsets)
        assert mx.array_equal(wrapped(x, offset=offsets), expected).item()
    x = mx.array(rng.standard_normal((1, 3, 5, 64)).astype(np.float32))  # int offset
    assert mx.array_equal(wrapped(x, offset=9), inner(x, offset=9)).item()


def test_layers_with_different_ropes_get_their_own_tables():
    tables = rope.StepTables()  # one per model, shared by every layer
    inners = [nn.RoPE(64, base=10000.0), nn.RoPE(64, base=1000000.0), nn.RoPE(64, scale=0.5)]
    wrapped = [rope.TableRoPE(r, tables) for r in inners]
    assert len({w.signature for w in wrapped}) == 3
    x = mx.array(np.random.default_rng(1).standard_normal((2, 3, 1, 64)).astype(np.float32))
    offsets = mx.array([3, 40], dtype=mx.int32)
    for inner, w in zip(inners, wrapped):
        assert mx.array_equal(w(x, offset=offsets), inner(x, offset=offsets)).item()
    assert rope.signature(nn.RoPE(64)) == rope.signature(nn.RoPE(64))  # layers share


def test_ropes_that_scale_their_input_are_left_alone():
    class Attention(nn.Module):
        def __init__(self, r):
            super().__init__()
            self.rope = r

    yarn = initialize_rope(64, 10000.0, False, {"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 4096},
                           max_position_embeddings=16384)
    model = nn.Module()
    model.layers = [Attention(yarn), Attention(nn.RoPE(64))]
    assert rope.install(model) == 1
    assert model.layers[0].rope is yarn and isinstance(model.layers[1].rope, rope.TableRoPE)


def test_tables_follow_each_step():
    inner = nn.RoPE(64)
    wrapped = rope.TableRoPE(inner, rope.StepTables())
    x = mx.ones((2, 1, 1, 64))
    for step in range(3):  # a new offsets array each step, as the runner builds
        offsets = mx.array([step, 10 + step], dtype=mx.int32)
        assert mx.array_equal(wrapped(x, offset=offsets), inner(x, offset=offsets)).item()


def test_installed_model_decodes_bitwise_the_same(model_dir):
    def run(install: bool) -> mx.array:
        model = model_loader.load(model_dir, "float32")
        if install:
            assert rope.install(model) == model.args.num_hidden_layers
            assert rope.install(model) == 0  # idempotent
        args = model.args
        pool = PagedKVPool(args.num_hidden_layers, 32, 4, args.num_key_value_heads,
                           args.hidden_size // args.num_attention_heads, mx.float32)
        tables = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
        prompt = build_layout([0, 0], [9, 6], tables, 4)
        tokens = mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 0, 0, 0]])
        out = [model.model(tokens, cache=pool.layer_caches(prompt))]
        step = build_layout([9, 6], [1, 1], tables, 4)
        out.append(model.model(mx.array([[11], [12]]), cache=pool.layer_caches(step)))
        return mx.concatenate([o.reshape(-1) for o in out])

    assert mx.array_equal(run(True), run(False)).item()
