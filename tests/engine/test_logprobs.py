"""Logprob layouts as vLLM's scheduler slices them (prompt logprobs end to end are in
test_model_runner.py)."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_ray_metal.engine import logprobs

pytestmark = pytest.mark.unit


def test_logprob_rows_follow_vllms_cumulative_offsets():
    # requests 0 and 2 sampled 3 and 1 tokens; request 1 (a prefill chunk) none
    ids = np.arange(8, dtype=np.int32).reshape(4, 2)
    lists = logprobs.in_request_order((ids, ids.astype(np.float32), ids[:, 0]),
                                      [0, 2], [3, 1], 3)
    assert lists.cu_num_generated_tokens == [0, 3, 3, 4]
    assert lists.slice_request(0, 3).logprob_token_ids.tolist() == ids[:3].tolist()
    assert lists.slice_request(2, 1).logprob_token_ids.tolist() == ids[3:].tolist()
    one_each = logprobs.in_request_order((ids[:2], ids[:2].astype(np.float32), ids[:2, 0]),
                                         [0, 2], [1, 1], 3)  # no speculation: a row each
    assert one_each.cu_num_generated_tokens is None
    assert one_each.logprob_token_ids.tolist() == [ids[0].tolist(), [0, 0], ids[1].tolist()]
