"""Each MLX / mlx-lm touch-point of compat/mlx.py, called on a tiny input. The ring group
over real peers runs in tests/engine/test_tensor_parallel.py; the kernel cache directory
in tests/cpu/test_jit.py."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from vllm_ray_metal.compat import mlx as compat_mlx

pytestmark = pytest.mark.unit


def test_pinned_versions():
    import importlib.metadata as metadata

    assert metadata.version("mlx").startswith(compat_mlx.MLX_VERSION)
    assert metadata.version("mlx-lm").startswith(compat_mlx.MLX_LM_VERSION)


def test_families_resolve_like_mlx_lms_loader():
    assert compat_mlx.family_module_name("mistral") == "llama"  # remapped
    assert compat_mlx.family_module("mistral").__name__ == "mlx_lm.models.llama"
    assert hasattr(compat_mlx.family_module("qwen3").Model, "shard")
    assert compat_mlx.family_exists("llama") and not compat_mlx.family_exists("no_such_model")
    types = compat_mlx.supported_model_types()
    assert {"llama", "qwen2", "qwen3"} <= set(types)
    assert not {"base", "cache", "rope_utils", "activations"} & set(types)


def test_load_model_lazily_from_a_directory(model_dir):
    model = compat_mlx.load_model(model_dir, lazy=True)
    assert len(model.model.layers) == 30 and hasattr(model.model, "embed_tokens")


def test_attention_mask_and_swiglu_helpers():
    h = mx.zeros((1, 3, 8))
    assert compat_mlx.create_attention_mask(h, None) is not None  # 3 queries: causal
    gate, x = mx.array([[-2.0, 0.5, 3.0]]), mx.array([[1.0, 2.0, -1.0]])
    want = np.asarray(nn.silu(gate) * x)
    assert np.allclose(np.asarray(compat_mlx.compiled_swiglu()(gate, x)), want, atol=1e-6)


def test_single_call_ropes_are_one_fast_rope():
    from mlx_lm.models.rope_utils import initialize_rope

    classes = compat_mlx.single_call_rope_classes()
    llama3 = initialize_rope(16, 10000.0, False, {"rope_type": "llama3", "factor": 8.0,
                                                  "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64})
    assert nn.RoPE in classes and type(llama3) in classes
    x = mx.random.normal((1, 2, 5, 16), key=mx.random.key(0))
    rope = nn.RoPE(16, base=10000.0)
    assert np.array_equal(np.asarray(rope(x, offset=3)),
                          np.asarray(mx.fast.rope(x, 16, traditional=False, base=10000.0,
                                                  scale=1.0, offset=3)))


def test_sharded_linear_types_are_what_shard_makes():
    from mlx.nn.layers.distributed import shard_linear

    group = mx.distributed.init()  # one rank
    column = shard_linear(nn.Linear(8, 4), "all-to-sharded", group=group)
    row = shard_linear(nn.Linear(8, 4), "sharded-to-all", group=group)
    assert type(column) is compat_mlx.column_sharded_linear()
    assert type(row) in compat_mlx.row_sharded_linears() and hasattr(row, "group")


def test_linear_layouts_and_the_row_sharded_call_split_in_two():
    from mlx.nn.layers.distributed import shard_linear

    group = mx.distributed.init()  # a one-process group: the sharded classes, whole weights
    plain = nn.Linear(64, 32)
    assert compat_mlx.linear_layout(plain) == ("plain", 64, 32)
    assert compat_mlx.linear_layout(nn.QuantizedLinear.from_linear(plain)) == ("plain", 64, 32)
    column = shard_linear(plain, "all-to-sharded", group=group)
    assert compat_mlx.linear_layout(column) == ("column", 64, 32)
    row = shard_linear(plain, "sharded-to-all", group=group)
    assert isinstance(row, compat_mlx.row_sharded_linears())
    assert compat_mlx.linear_layout(row) == ("row", 64, 32)
    x = mx.random.normal((2, 3, 64), key=mx.random.key(1))
    for layer in (row, nn.QuantizedShardedToAllLinear.from_quantized_linear(
            nn.QuantizedLinear.from_linear(plain), group=group)):
        split = compat_mlx.row_sharded_finish(layer, compat_mlx.row_sharded_partial(layer, x))
        assert mx.allclose(split, layer(x), atol=1e-5)
