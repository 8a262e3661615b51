"""The grammar bitmask in MLX against vLLM's own bitmask step (xgrammar's kernel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.unit
def test_bitmask_equals_vllms_bitmask_step():
    """Our MLX unpacking forbids exactly the tokens vLLM's bitmask step (xgrammar's kernel)
    forbids, in the request order vLLM gives and for rows that are not constrained."""
    import mlx.core as mx

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

    # vLLM's own bitmask step (what its GPU and CPU runners call) on a torch copy
    from types import SimpleNamespace

    from vllm.v1.structured_output.utils import apply_grammar_bitmask

    reference = torch.from_numpy(logits.copy())
    apply_grammar_bitmask(SimpleNamespace(scheduled_spec_decode_tokens={}), Output,
                          SimpleNamespace(req_ids=rows), reference)
    np.testing.assert_array_equal(ours, reference.numpy())
    assert np.isinf(ours[0]).any() and not np.isinf(ours[1]).any()
    assert grammar.step_bitmask(Output, ["b"]) is None  # no constrained row sampled


@pytest.mark.unit
def test_logits_wider_than_the_mask():
    """Past the mask's last word: forbidden to constrained rows, untouched in free ones."""
    import mlx.core as mx

    from vllm_ray_metal.engine import grammar

    words = np.zeros((1, 2), np.int32)
    words[0, 0] = 1 << 3  # only token 3 allowed

    class Output:
        structured_output_request_ids = ["c"]
        grammar_bitmask = words

    mask = grammar.step_bitmask(Output, ["f", "c"])
    logits = np.arange(2 * 70, dtype=np.float32).reshape(2, 70)  # 70 > 64 bits
    out = np.asarray(grammar.apply(mx.array(logits), mask))
    np.testing.assert_array_equal(out[0], logits[0])
    assert np.isfinite(out[1]).tolist() == [i == 3 for i in range(70)]
    assert grammar.step_bitmask(None, ["c"]) is None
