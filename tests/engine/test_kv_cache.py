"""The paged KV cache against mlx-lm's own contiguous KVCache, on the real model."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from vllm_ray_metal.engine import model_loader
from vllm_ray_metal.engine.kv_cache import PagedKVPool, build_layout

pytestmark = pytest.mark.unit
BLOCK = 4


@pytest.fixture(scope="module")
def model(model_dir):
    return model_loader.load(model_dir, "float32")


def reference_logits(model, tokens: list[int]) -> np.ndarray:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    return np.asarray(model(mx.array([tokens]), cache=cache)[0])


def paged_logits(model, pool, chunks, block_table, start=0) -> list[np.ndarray]:
    """Feed ``chunks`` of one sequence through the paged cache, like chunked prefill."""
    out = []
    for chunk in chunks:
        layout = build_layout([start], [len(chunk)], [block_table], BLOCK)
        h = model.model(mx.array([chunk]), cache=pool.layer_caches(layout))
        out.append(np.asarray(model_loader.compute_logits(model, h)[0]))
        start += len(chunk)
    return out


def make_pool(model, blocks=64):
    args = model.args
    return PagedKVPool(args.num_hidden_layers, blocks, BLOCK, args.num_key_value_heads,
                       args.hidden_size // args.num_attention_heads, mx.float32, initial_blocks=4)


def test_chunked_paged_prefill_matches_contiguous_cache(model):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 40000, size=23).tolist()
    ref = reference_logits(model, tokens)
    pool = make_pool(model)
    table = [9, 3, 17, 5, 40, 2, 33]  # scattered, out of order, forces pool growth
    got = np.concatenate(paged_logits(model, pool, [tokens[:10], tokens[10:11], tokens[11:]],
                                      table))
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
    assert pool.capacity >= 41


def test_batched_rows_with_padding_match_single_rows(model):
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, 40000, size=9).tolist(), rng.integers(3, 40000, size=3).tolist()
    pool = make_pool(model)
    ta, tb = [4, 6, 8], [5]
    # prefill both separately, then one batched step with different lengths (2 vs 1)
    paged_logits(model, pool, [a[:7]], ta)
    paged_logits(model, pool, [b[:2]], tb)
    layout = build_layout([7, 2], [2, 1], [ta, tb], BLOCK)
    x = mx.array([a[7:9], [b[2], 0]])
    h = model.model(x, cache=pool.layer_caches(layout))
    logits = np.asarray(model_loader.compute_logits(model, h))
    np.testing.assert_allclose(logits[0, :2], reference_logits(model, a)[7:9], atol=2e-4,
                               rtol=1e-4)
    np.testing.assert_allclose(logits[1, 0], reference_logits(model, b)[2], atol=2e-4,
                               rtol=1e-4)


def test_layout_never_reads_other_sequences():
    layout = build_layout([3, 0], [2, 1], [[7, 8], [9]], 4)
    read = np.asarray(layout.read_slots)
    mask = np.asarray(layout.mask)[:, 0]
    # row 0 sees positions 0..4 -> slots 28,29,30,31,32 ; row 1 sees only slot 36
    assert read[0].tolist() == [28, 29, 30, 31, 32]
    assert read[1, 0] == 36 and set(read[1, 1:].tolist()) == {0}
    assert mask[0, 0].tolist() == [True, True, True, True, False]  # causal within step
    assert mask[0, 1].tolist() == [True] * 5
    assert mask[1, 0].tolist() == [True, False, False, False, False]
    assert np.asarray(layout.write_slots).tolist() == [31, 32, 36, 0]  # padding -> null block


def test_fully_visible_decode_has_no_mask_and_attends_the_same(model):
    """Rows whose queries see their whole context drop the mask; the logits do not change."""
    layout = build_layout([5, 5], [1, 1], [[1, 2], [3, 4]], BLOCK)
    assert layout.mask is None  # decode rows with equal contexts
    assert build_layout([5, 3], [1, 1], [[1, 2], [3]], BLOCK).mask is not None
    cache = make_pool(model).layer_caches(layout)[0]
    assert cache.make_mask(1) is None
    full = cache.make_mask(1, return_array=True)  # for callers that combine masks
    assert full.shape == (2, 1, 1, 6) and full.all().item()

    tokens = np.random.default_rng(3).integers(3, 40000, size=6).tolist()
    logits = []
    for explicit in (False, True):
        pool = make_pool(model)
        paged_logits(model, pool, [tokens[:5]], [2, 7])
        step = build_layout([5], [1], [[2, 7]], BLOCK)
        if explicit:
            step.mask = mx.ones((1, 1, 1, 6), dtype=mx.bool_)
        h = model.model(mx.array([tokens[5:]]), cache=pool.layer_caches(step))
        logits.append(model_loader.compute_logits(model, h))
    assert mx.array_equal(logits[0], logits[1]).item()
