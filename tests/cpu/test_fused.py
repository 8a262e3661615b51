"""Fused projections: the same outputs as mlx-lm's separate ones, only where they apply."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama, qwen2

from vllm_ray_metal.cpu import fused
from vllm_ray_metal.engine import model_loader
from vllm_ray_metal.testing.models import mlx_llama

pytestmark = [pytest.mark.unit, pytest.mark.skipif(mx.default_device() != mx.cpu,
                                 reason="fused projections are installed on the CPU only")]


def tiny(module, **extra) -> nn.Module:
    return mlx_llama(module.__name__.rsplit(".", 1)[-1], **extra)


@pytest.mark.parametrize("module, extra", [(llama, {"tie_word_embeddings": False}),
                                           (qwen2, {"tie_word_embeddings": True})],
                         ids=["llama", "qwen2-bias"])
def test_fused_model_gives_the_same_logits_and_counts_weights_once(module, extra):
    model, reference = tiny(module, **extra), tiny(module, **extra)
    reference.update(model.parameters())
    size = model_loader.parameter_bytes(model)
    assert fused.install(model) == 4  # attention and MLP of each layer
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, fused.FusedPart) and isinstance(attn.fused_q_k_v,
                                                                   fused.FusedLinear)
    assert attn.k_proj.weight.shape == reference.model.layers[0].self_attn.k_proj.weight.shape
    assert model_loader.parameter_bytes(model) == size
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (3, 1), (2, 9)):
        tokens = mx.array(rng.integers(0, 97, shape), dtype=mx.int32)
        np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(reference(tokens)),
                                   rtol=1e-5, atol=1e-5)


def test_parts_work_alone_and_on_new_inputs():
    lins = [nn.Linear(8, n) for n in (8, 4, 4)]
    mx.eval([lin.parameters() for lin in lins])
    group = fused.FusedLinear(lins)
    parts = [fused.FusedPart(group, i) for i in range(3)]
    x, y = mx.random.normal((2, 8)), mx.random.normal((2, 8))
    # k alone, then q and k of a new input before v of the first: each output is right
    for part, inp in ((1, x), (0, y), (1, y), (2, x), (2, y)):
        assert mx.allclose(parts[part](inp), lins[part](inp), atol=1e-6).item()
    assert group._input is y
    parts[0](y), parts[1](y)
    assert group._input is None  # all three parts of y's last product taken: nothing held


def test_column_sharded_groups_fuse_like_linears():
    """Tensor parallel's q/k/v and gate/up are AllToShardedLinear: a local product."""
    from mlx.nn.layers.distributed import AllToShardedLinear

    block, reference = nn.Module(), {}
    group = mx.distributed.init()  # one rank: the shards are the whole matrices
    for name, out in (("q_proj", 8), ("k_proj", 4), ("v_proj", 4)):
        reference[name] = nn.Linear(8, out)
        setattr(block, name, AllToShardedLinear.from_linear(reference[name], group=group))
    assert fused.install(block) == 1
    x = mx.random.normal((3, 8))
    for name, lin in reference.items():
        assert mx.allclose(block[name](x), lin(x), atol=1e-6).item(), name


def test_groups_that_are_not_plain_linears_stay():
    block = nn.Module()
    block.q_proj, block.k_proj, block.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), \
        nn.QuantizedLinear(64, 4)
    block.gate_proj, block.up_proj = nn.Linear(8, 16), nn.Linear(8, 16, bias=False)
    assert fused.install(block) == 0  # a quantized member; bias on one of two
    assert type(block.q_proj) is nn.Linear and type(block.gate_proj) is nn.Linear
