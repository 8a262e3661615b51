"""Speculative decoding's pieces: the n-gram proposer, verification (greedy and
rejection sampling, against the distributions non-speculative sampling draws from),
and the per-token layouts of the bitmask and of logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest
import torch
from vllm import SamplingParams

from vllm_ray_metal.engine import grammar, sampler
from vllm_ray_metal.engine.speculative import DraftPolicy, NgramProposer, next_drafts

from test_sampler import Row  # the sampler's view of a request

pytestmark = pytest.mark.unit


def propose(tokens: list[int], k: int = 3, min_n: int = 1, max_n: int = 4,
            max_len: int = 100) -> list[int]:
    return NgramProposer(k, min_n, max_n, max_len).propose(np.asarray(tokens))


def test_ngram_proposes_what_followed_the_longest_latest_match():
    # suffix [7, 8, 9] occurred at 1..3 (then 4, 5, 6); [8, 9] alone also at 10..11
    tokens = [0, 7, 8, 9, 4, 5, 6, 3, 3, 3, 8, 9, 1, 2, 7, 8, 9]
    assert propose(tokens) == [4, 5, 6]
    assert propose(tokens, max_n=2) == [1, 2, 7]  # only 2-grams: the latest [8, 9]
    assert propose(tokens, k=1) == [4]
    assert propose([5, 6, 1, 2, 3, 4]) == []  # the last token never occurred before
    assert propose([1, 2, 3, 1, 2, 3], min_n=4) == []  # the match is 3 tokens long
    assert propose([4, 4, 4, 4]) == [4]  # the one 3-token match leaves one token after it
    assert propose([1, 2, 3, 1, 2, 3, 1, 2], k=5, max_n=3) == [3, 1, 2]
    assert propose(tokens, max_len=len(tokens) + 2) == [4, 5]  # room left in the model
    assert propose(tokens, max_len=len(tokens)) == []


def test_ngram_rejects_bad_parameters():
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        NgramProposer(2, 3, 2, 100)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        NgramProposer(0, 1, 2, 100)


def rows_of(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, vocab)) * 2).astype(np.float32)


def test_greedy_keeps_drafts_while_they_equal_the_argmax():
    x = rows_of(20, 9)
    top = x.argmax(-1).tolist()
    greedy = Row(SamplingParams(temperature=0))
    drafts = [[top[0], top[1], top[2]],  # all accepted: plus the bonus token
              [top[4], (top[5] + 1) % 20],  # the second is wrong: the argmax replaces it
              [-1, top[7]]]  # a placeholder is always rejected
    got, lp = sampler.verify(mx.array(x), [greedy] * 3, drafts, np.random.default_rng(0))
    assert got == [top[0:4], top[4:6], [top[7]]] and lp is None


def test_greedy_with_penalties_counts_the_accepted_drafts():
    x = np.zeros((2, 6), np.float32)
    x[:, 4], x[:, 3] = 1.5, 1.0  # token 4 is the argmax at both positions
    row = Row(SamplingParams(temperature=0, presence_penalty=2.0))
    got, _ = sampler.verify(mx.array(x), [row], [[4]], np.random.default_rng(0))
    assert got == [[4, 3]]  # at position 2, the accepted draft 4 is already "present"


def chi_square_p(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square test p-value (the upper regularised gamma function)."""
    statistic = float(((counts - expected) ** 2 / expected).sum())
    df = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def probs_of(x: np.ndarray, params: SamplingParams) -> np.ndarray:
    p = sampler._probs(x.astype(np.float64), params)
    return p / p.sum()


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.9),
                                    SamplingParams(temperature=1.3, top_k=4, top_p=0.9)],
                         ids=["temperature", "top_k_top_p"])
def test_rejection_sampling_draws_what_plain_sampling_draws(params):
    """With a draft at the first position, the first token is distributed as plain
    sampling's at that position, and after an accepted draft the next one as plain
    sampling's at the next (chi-square over many draws on a 6-token vocabulary)."""
    vocab, draws = 6, 12000
    x = rows_of(vocab, 2, seed=3) * 0.4  # flat enough that top-k / top-p keep several
    p0, p1 = probs_of(x[0], params), probs_of(x[1], params)
    assert (p0 > 0).sum() >= 3 and (p1 > 0).sum() >= 3
    draft = int(np.argsort(p0)[-2])  # a likely, not the likeliest, token
    row = Row(params, generator=np.random.default_rng(11))
    first, second = np.zeros(vocab), np.zeros(vocab)
    logits = mx.array(x)
    for _ in range(draws):
        (tokens,), _ = sampler.verify(logits, [row], [[draft]], np.random.default_rng(0))
        first[tokens[0]] += 1
        if tokens[0] == draft:
            assert len(tokens) == 2
            second[tokens[1]] += 1
        else:
            assert len(tokens) == 1
    for counts, p in ((first, p0), (second, p1)):
        support = p > 0
        assert counts[~support].sum() == 0  # nothing outside top-k / top-p
        assert chi_square_p(counts[support], counts.sum() * p[support]) > 1e-3
    assert abs(second.sum() / draws - p0[draft]) < 0.03  # the acceptance rate is p(draft)


def test_a_seeded_request_verifies_alike_whatever_the_batch():
    x = rows_of(30, 4, seed=5)
    params = SamplingParams(temperature=1.0, seed=7)

    def run(extra: int) -> list[int]:
        rows = [Row(params, generator=np.random.default_rng(7))]
        drafts = [[int(x[0].argmax()), 2, 3]]
        logits = x
        for i in range(extra):  # unseeded neighbours draw from the default generator
            rows.append(Row(SamplingParams(temperature=1.0)))
            drafts.append([])
            logits = np.concatenate([logits, rows_of(30, 1, seed=i)])
        return sampler.verify(mx.array(logits), rows, drafts, np.random.default_rng(1))[0][0]

    assert run(0) == run(2)


def test_logprobs_come_from_each_tokens_own_position():
    x = rows_of(20, 5)
    top = x.argmax(-1).tolist()
    rows = [Row(SamplingParams(temperature=0, logprobs=2)), Row(SamplingParams(temperature=0))]
    got, (ids, lps, ranks) = sampler.verify(mx.array(x), rows, [[top[0], top[1]], [top[3]]],
                                            np.random.default_rng(0))
    assert got == [top[0:3], top[3:5]]
    ref = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - x.max(-1, keepdims=True)
    assert ids.shape == (5, 3) and ids[:3, 0].tolist() == top[:3]
    np.testing.assert_allclose(lps[:3, 0], ref[[0, 1, 2], top[:3]], atol=1e-5)
    assert ranks[:3].tolist() == [1, 1, 1]
    assert not ids[3:].any()  # the second request asked for none


def test_bitmask_rows_per_draft_position():
    class Output:  # vLLM's GrammarOutput: "b" has 2 drafts (3 rows), "c" none, "a" 1
        structured_output_request_ids = ["b", "c", "a"]
        grammar_bitmask = np.arange(6 * 2, dtype=np.int32).reshape(6, 2)

    # the step sampled a (2 rows), d (free, 1 row), b (3 rows); c did not sample
    mask = grammar.step_bitmask(Output, ["a", "d", "b"], {"a": 1, "b": 2, "d": 0})
    words = Output.grammar_bitmask
    assert mask.tolist() == [*words[4:6].tolist(), [-1, -1], *words[0:3].tolist()]


def test_drafts_shrink_as_more_requests_decode():
    @dataclass
    class State:
        tokens: list[int]

        def token_array(self) -> np.ndarray:
            return np.asarray(self.tokens)

    proposer = NgramProposer(4, 1, 3, 1000)
    periodic = State([1, 2, 3, 4, 5, 6, 7] * 3)  # every draft has a match
    assert next_drafts(proposer, [periodic] * 2, 4) == [[1, 2, 3, 4]] * 2
    assert next_drafts(proposer, [periodic] * 2, 2) == [[1, 2]] * 2  # vLLM's schedule
    # 32 rows a forward: 8 requests get 3 drafts, 16 one, 17 none
    assert next_drafts(proposer, [periodic] * 8, 4) == [[1, 2, 3]] * 8
    assert next_drafts(proposer, [periodic] * 16, 4) == [[1]] * 16
    assert next_drafts(proposer, [periodic] * 17, 4) == [[]] * 17


def test_draft_policy_offers_drafts_only_where_they_were_measured_to_pay():
    @dataclass
    class State:
        spec_gain: float | None = None

    policy = DraftPolicy()
    chat = [State() for _ in range(16)]
    assert not policy.offer(chat, 1)  # nothing measured: plain decoding first
    policy.offered, policy.proposing_s = 0, 0.0
    policy.record_step(16, 9.0)  # a first run of its shape: not counted
    assert not policy.offer(chat, 1)
    policy.record_step(16, 1.0)
    assert policy.offer(chat, 1)  # then with drafts
    policy.offered, policy.proposing_s = 1, 0.1
    policy.record_step(16, 9.0)
    assert policy.offer(chat, 1)
    policy.record_step(16, 1.5)  # 1.6 s with drafts (proposing included) vs 1.0 s
    for s in chat:  # chat text: drafts seldom accepted
        for _ in range(10):
            policy.record_gain(s, 0)
    choices = [policy.offer(chat, 1) for _ in range(64)]
    # plain, but drafts are tried now and then: every 16 x 1.6 decisions (their cost)
    assert choices.count(True) == 2 and choices.index(True) == 25
    for s in chat:  # quoting a document: nearly every draft accepted
        for _ in range(10):
            policy.record_gain(s, 1)
    assert policy.offer(chat, 1)  # 32 tokens in 1.6 s beat 16 in 1.0 s
    assert policy.prior > 0.9  # a new request starts from what requests won lately
    # a costlier step where drafts are cheap (a GPU): offered even at low acceptance
    policy.cost[(16, 1)] = 1.05
    for s in chat:
        s.spec_gain = 0.2
    assert policy.offer(chat, 1)
    # a draft model as costly as the target: a drafted step (4 proposals) costs 9 plain
    # ones, so even 4 accepted drafts lose, and it is tried only every 16 x 9 decisions
    one = [State()]
    drafting = DraftPolicy()
    drafting.cost = {(1, 0): 0.05, (1, 4): 0.45}
    drafting.prior = 4.0
    assert [drafting.offer(one, 4) for _ in range(288)].count(True) == 2
    # and not while the draft lags far behind (a trial would first run it over every
    # token it missed), but as soon as it is close behind
    assert not any(drafting.offer(one, 4, lag=100) for _ in range(300))
    assert drafting.offer(one, 4, lag=3)
    assert DraftPolicy("always").offer(chat, 1)  # VLLM_RAY_METAL_SPEC_DRAFTS=always
    with pytest.raises(ValueError, match="measure or always"):
        DraftPolicy("sometimes")
