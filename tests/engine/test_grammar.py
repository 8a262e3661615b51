"""The grammar bitmask in MLX against xgrammar's own kernel (the reference vLLM uses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.unit
def test_bitmask_equals_xgrammar_kernel():
    """Our MLX unpacking forbids exactly the tokens xgrammar's own kernel forbids, in the
    request order vLLM gives and for rows that are not constrained."""
    import mlx.core as mx
    import xgrammar as xgr

    from vllm_ray_metal.engine import grammar

    rng = np.random.default_rng(0)
    vocab = 1000
    words = rng.integers(-2**31, 2**31, size=(2, (vocab + 31) // 32), dtype=np.int64)
    words = words.astype(np.int32)

    class Output:
        structured_output_request_ids = ["c", "a"]  # scheduler order, not the row order
        grammar_bitmask = words

    rows = ["a", "b", "c"]
    mask = grammar.step_bitmask(Output, rows)
    logits = rng.standard_normal((3, vocab)).astype(np.float32)
    ours = np.asarray(grammar.apply(mx.array(logits), mask))

    reference = torch.from_numpy(logits.copy())
    xgr.apply_token_bitmask_inplace(reference, torch.from_numpy(words), indices=[2, 0])
    np.testing.assert_array_equal(ours, reference.numpy())
    assert np.isinf(ours[0]).any() and not np.isinf(ours[1]).any()
    assert grammar.step_bitmask(Output, ["b"]) is None  # no constrained row sampled
