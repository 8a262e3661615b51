"""Sampler semantics against direct numpy references."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
import pytest
from vllm import SamplingParams

from vllm_ray_metal.engine import sampler

pytestmark = pytest.mark.unit


@dataclass
class Row:
    sampling_params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=lambda: [1, 2])
    output_token_ids: list[int] = field(default_factory=list)
    generator: np.random.Generator | None = None


def logits(rows=3, vocab=50, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, vocab)).astype(np.float32) * 3


def test_greedy_fast_path_is_argmax():
    x = logits()
    toks, lp = sampler.sample(mx.array(x), [Row(SamplingParams(temperature=0))] * 3,
                              np.random.default_rng(0))
    assert toks == x.argmax(-1).tolist() and lp is None


def test_logprobs_are_raw_log_softmax_with_ranks():
    x = logits()
    rows = [Row(SamplingParams(temperature=0, logprobs=4)), Row(SamplingParams(temperature=0)),
            Row(SamplingParams(temperature=0.0, logprobs=2, logit_bias={7: 100.0}))]
    toks, (ids, lps, ranks) = sampler.sample(mx.array(x), rows, np.random.default_rng(0))
    ref = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - x.max(-1, keepdims=True)
    assert ids.shape == (3, 5)
    assert ids[0, 0] == toks[0] and ranks[0] == 1
    np.testing.assert_allclose(lps[0], ref[0, ids[0]], atol=1e-5)
    assert ids[0, 1:].tolist() == np.argsort(-ref[0])[:4].tolist()
    # logit_bias changes the choice but logprobs stay raw: the chosen token's rank shows it
    assert toks[2] == 7
    np.testing.assert_allclose(lps[2, 0], ref[2, 7], atol=1e-5)
    assert ranks[2] == int((ref[2] >= ref[2, 7]).sum())
    assert not ids[1].any()  # row 1 asked for none


def test_top_k_top_p_min_p_restrict_support():
    x = logits(rows=1, vocab=30)
    order = np.argsort(-x[0])
    draws = set()
    rng = np.random.default_rng(0)
    for _ in range(300):
        toks, _ = sampler.sample(mx.array(x), [Row(SamplingParams(temperature=1.0, top_k=3))],
                                 rng)
        draws.add(toks[0])
    assert draws <= set(order[:3].tolist()) and len(draws) >= 2
    p = np.exp(x[0] - x[0].max()); p /= p.sum()
    cum = np.cumsum(p[order])
    keep = set(order[: int(np.searchsorted(cum, 0.5)) + 1].tolist())
    for _ in range(200):
        toks, _ = sampler.sample(mx.array(x), [Row(SamplingParams(temperature=1.0, top_p=0.5))],
                                 rng)
        assert toks[0] in keep
    allowed = set(np.nonzero(p >= 0.3 * p.max())[0].tolist())
    for _ in range(200):
        toks, _ = sampler.sample(mx.array(x), [Row(SamplingParams(temperature=1.0, min_p=0.3))],
                                 rng)
        assert toks[0] in allowed


def test_seeded_rows_are_independent_of_batch():
    x = logits(rows=2)

    def run(batch):
        rows = [Row(SamplingParams(temperature=0.8, seed=5), generator=np.random.default_rng(5))
                for _ in range(batch)]
        return [sampler.sample(mx.array(x[:1].repeat(batch, 0)), rows, np.random.default_rng(9))[0]
                for _ in range(1)][0]

    assert len(set(run(3))) == 1 and run(1)[0] == run(3)[0]


def test_penalties_and_min_tokens():
    x = np.zeros((1, 10), np.float32)
    x[0, 4], x[0, 3] = 1.5, 1.0
    row = Row(SamplingParams(temperature=0, presence_penalty=2.0), output_token_ids=[4])
    assert sampler.sample(mx.array(x), [row], np.random.default_rng(0))[0] != [4]
    row = Row(SamplingParams(temperature=0, repetition_penalty=2.0), prompt_token_ids=[4])
    assert sampler.sample(mx.array(x), [row], np.random.default_rng(0))[0] != [4]
    row = Row(SamplingParams(temperature=0, presence_penalty=2.0), output_token_ids=[3])
    assert sampler.sample(mx.array(x), [row], np.random.default_rng(0))[0] == [4]
    row = Row(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[4]))
    assert sampler.sample(mx.array(x), [row], np.random.default_rng(0))[0] != [4]
