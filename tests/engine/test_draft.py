"""The draft model's proposal loop (``engine/draft.py``) on a tiny in-memory model: its
proposals are the model's own greedy continuation (reference: recomputing every
position from scratch, no cache), before and after verification accepts some of them,
read from the paged pool or from a mirror of it, and its KV is trusted exactly as far
as the request's real tokens match what it fed."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from vllm_ray_metal.engine import draft
from vllm_ray_metal.engine.requests import RequestState
from vllm_ray_metal.testing.models import mlx_llama

pytestmark = pytest.mark.unit
BLOCK = 16
K = 4


def greedy(model, tokens: list[int], n: int) -> list[int]:
    out = list(tokens)
    for _ in range(n):
        logits = model(mx.array([out]))[0, -1]
        out.append(int(mx.argmax(logits)))
    return out[len(tokens):]


# the pool alone; a mirror that holds every request; one too small for the long prompt
# (those proposals fall back to the pool)
@pytest.fixture(scope="module", params=[0, 8192, 600], ids=["pool", "mirror", "tight"])
def drafter(request):
    model = mlx_llama(norm_weights_seed=1)
    config = SimpleNamespace(model="tiny", revision=None,
                             get_total_num_hidden_layers=lambda: 2,
                             get_total_num_kv_heads=lambda: 2, get_head_size=lambda: 16)
    d = draft.DraftModel(config, "float32", mx.float32, BLOCK, max_model_len=2048)
    d.model = model
    d.init_pool(200, request.param)
    d.warm_up()
    return d


def request(name: str, prompt: list[int], first_block: int) -> RequestState:
    blocks = -(-(len(prompt) + 3 * (K + 1)) // BLOCK) + 1  # room for three rounds
    return RequestState(name, prompt, None, list(range(first_block, first_block + blocks)),
                        len(prompt), None)


def test_proposals_are_the_drafts_greedy_continuation_across_rounds(drafter):
    rng = np.random.default_rng(0)
    # one prompt longer than a catch-up piece (it catches up in pieces, alone)
    prompts = [rng.integers(0, 97, n).tolist() for n in (5, 37, draft.CATCH_UP_PIECE + 70)]
    states = [request("a", prompts[0], 1), request("b", prompts[1], 20),
              request("c", prompts[2], 60)]
    model = drafter.model
    for round_ in range(3):
        got = drafter.propose_all(states, K)
        want = [greedy(model, s.token_array().tolist(), K) for s in states]
        assert got == want, f"round {round_}"
        mirrored = drafter.mirror is not None and drafter.mirror.max_positions > 4 * 768
        assert (drafter._slots is not None) == mirrored
        assert [s.draft_computed for s in states] == [s.num_tokens for s in states]
        # verification: a keeps 2 drafts, b all 4, c none; each adds a token of its own
        for s, keep in zip(states, (2, K, 0)):
            bonus = (got[states.index(s)][keep] + 1) % 97 if keep < K else 7
            s.output_token_ids.extend(got[states.index(s)][:keep] + [bonus])
        assert drafter.lag(states) == K + 1  # b's four accepted drafts and its bonus token


def test_draft_kv_is_trusted_as_far_as_the_real_tokens_match():
    state = RequestState("r", list(range(10)), None, [1], 10, None)
    state.draft_computed, state.draft_proposed = 10, [50, 51, 52, 53]  # 50..52 were fed
    state.output_token_ids = [50, 51, 60]  # two accepted, then another token
    assert draft._still_valid(state, state.token_array()) == 12
    state.draft_computed, state.draft_proposed = 13, [70, 71, 72, 73]
    state.output_token_ids += [70, 71, 72, 73, 74]  # every draft accepted: 73 was never fed
    assert draft._still_valid(state, state.token_array()) == 16
    state.draft_computed, state.draft_proposed = 10, [1, 2]
    assert draft._still_valid(state, state.token_array()[:8]) == 8  # fewer tokens now
    assert state.draft_proposed == []


def test_rows_propose_only_inside_their_blocks_and_the_model_length(drafter):
    prompt = list(range(30))
    tight = RequestState("t", prompt, None, [100, 101], 30, None)  # 32 slots: 2 ahead
    end = RequestState("e", prompt, None, [110, 111, 112], 30, None)
    assert [len(d) for d in drafter.propose_all([tight, end], K)] == [3, K]
    for max_len, n in ((31, 1), (30, 0)):  # the model's last position is max_len - 1
        short = draft.DraftModel(drafter.config, "float32", mx.float32, BLOCK, max_len)
        short.model, short.pool = drafter.model, drafter.pool
        at_end = RequestState("m", prompt, None, [120, 121, 122], 30, None)
        assert [len(d) for d in short.propose_all([at_end], K)] == [n]


def test_a_prefix_hit_reuses_the_drafts_filled_blocks_and_only_those(drafter):
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 97, 3 * BLOCK + 5).tolist()
    first = request("first", prompt, 130)
    drafter.propose_all([first], K)  # fills blocks 130-132 with the prompt's first 48
    # the same prompt's blocks handed to a second request (vLLM's prefix cache), and a
    # third request given the same block ids for other tokens (blocks freed and reused)
    hit = RequestState("hit", prompt + [3], None, first.block_ids[:3] + [140, 141, 142],
                       len(prompt), None)
    other_tokens = rng.integers(0, 97, 3 * BLOCK + 5).tolist()
    reused = RequestState("reused", other_tokens, None, first.block_ids[:3] + [150, 151, 152],
                          len(other_tokens), None)
    assert drafter._cached_prefix(hit, hit.token_array()) == 3 * BLOCK
    assert drafter._cached_prefix(reused, reused.token_array()) == 0
    got = drafter.propose_all([hit], K)
    assert got == [greedy(drafter.model, hit.token_array().tolist(), K)]
    # the reused blocks now hold other tokens' KV: the first prompt no longer hits them
    drafter.propose_all([reused], K)
    again = RequestState("again", prompt, None, first.block_ids[:3] + [160, 161], len(prompt),
                         None)
    assert drafter._cached_prefix(again, again.token_array()) == 0
    assert drafter.propose_all([again], K) == [greedy(drafter.model, prompt, K)]
