"""Speculative decoding (n-gram prompt lookup, and a draft model) under vLLM's
scheduler: what it generates equals what non-speculative decoding generates, and it
actually accepts proposals.

The reference is the same model without ``speculative_config`` (greedy: token for token,
logprobs too), and jsonschema for constrained output. The draft model is the default
model without one of its 30 layers: it agrees with the target often but not always, so
steps accept some drafts and reject others.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import StructuredOutputsParams

from vllm_ray_metal.testing.llm import make_llm, shutdown_llm
from vllm_ray_metal.testing.models import CHAT_PROMPTS, chat_token_ids, layer_subset
from vllm_ray_metal.testing.structured import PROMPTS, WEATHER

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
         "prompt_lookup_max": 4}
NEW_TOKENS = 40
BLOCK_BYTES = 16 * 2 * 30 * 3 * 64 * 4  # SmolLM2 fp32, 16 tokens


def greedy(n: int = NEW_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def generate(llm, prompts: list[list[int]], params) -> list:
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    return [o.outputs[0] for o in outs]


def counter(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


@pytest.fixture(scope="module", autouse=True)
def drafts_every_step():
    """Verification on every step (the measured policy may turn drafts off on this CPU,
    and these tests are about what verification keeps)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_RAY_METAL_SPEC_DRAFTS", "always")
        yield


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    """Input-grounded asks (repeat, quote, continue a list: long accepted runs) and
    free chat, eight in all."""
    readme = (ROOT / "README.md").read_text()
    passage = readme[readme.index("Long contexts"):][:600]
    grounded = [f"Repeat this text exactly:\n\n{passage}",
                f"Quote the first two sentences of this text:\n\n{passage}",
                "Continue the list: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
                "Copy this line three times: the quick brown fox jumps over the lazy dog."]
    return chat_token_ids(model_dir, grounded + CHAT_PROMPTS[:4])


@pytest.fixture(scope="module")
def plain(model_dir):
    engine = make_llm(model_dir)
    yield engine
    shutdown_llm(engine)


@pytest.fixture(scope="module")
def spec(model_dir):
    engine = make_llm(model_dir, speculative_config=NGRAM, disable_log_stats=False)
    yield engine
    shutdown_llm(engine)


def test_greedy_equals_non_speculative_batched_and_alone(plain, spec, prompts):
    reference = [list(o.token_ids) for o in generate(plain, prompts, greedy())]
    drafts_before = counter(spec, "vllm:spec_decode_num_draft_tokens")
    accepted_before = counter(spec, "vllm:spec_decode_num_accepted_tokens")
    together = [list(o.token_ids) for o in generate(spec, prompts, greedy())]
    drafted = counter(spec, "vllm:spec_decode_num_draft_tokens") - drafts_before
    accepted = counter(spec, "vllm:spec_decode_num_accepted_tokens") - accepted_before
    print(f"drafted {drafted:.0f}, accepted {accepted:.0f}")
    assert together == reference
    assert accepted > NEW_TOKENS  # more than one prompt's worth of tokens came for free
    assert drafted >= accepted
    alone = [list(generate(spec, [p], greedy())[0].token_ids) for p in prompts]
    assert alone == reference


def test_logprobs_and_stops_equal_non_speculative(plain, spec, prompts):
    """Logprobs of accepted tokens come from their own positions; a stop inside an
    accepted run ends the output where non-speculative decoding ends it."""
    params = greedy(24, logprobs=3)
    ref, got = generate(plain, prompts[:4], params), generate(spec, prompts[:4], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    for a, b in zip(got, ref):
        for pa, pb in zip(a.logprobs, b.logprobs):
            assert pa.keys() == pb.keys()
            for tok in pa:
                assert abs(pa[tok].logprob - pb[tok].logprob) < 1e-3
    # stop on a token the reference emits mid-run (the 10th of the first prompt)
    stop = list(ref[0].token_ids)[9]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop])
    ref, got = generate(plain, prompts[:1], params), generate(spec, prompts[:1], params)
    assert got[0].token_ids == ref[0].token_ids and got[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(spec, prompts):
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=123, max_tokens=32,
                            ignore_eos=True)
    first = [o.token_ids for o in generate(spec, prompts[:3], params)]
    second = [o.token_ids for o in generate(spec, prompts[:3], params)]
    assert first == second and all(len(t) == 32 for t in first)


def test_structured_output_under_speculation(plain, spec, model_dir, prompts):
    """The bitmask binds every verified position: a greedy JSON document equals the
    non-speculative one, beside free rows that still speculate."""
    (ask,) = chat_token_ids(model_dir, [PROMPTS["weather"]])
    schema = SamplingParams(temperature=0.0, max_tokens=64,
                            structured_outputs=StructuredOutputsParams(json=WEATHER))
    batch = [ask, *prompts[:2]]
    ref = generate(plain, batch, [schema, greedy(), greedy()])
    got = generate(spec, batch, [schema, greedy(), greedy()])
    assert got[0].finish_reason == "stop", got[0].text
    jsonschema.validate(json.loads(got[0].text), WEATHER)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]


def test_prefix_hits_and_preemption_under_speculation(model_dir, plain, prompts):
    """Rejected drafts' KV slots are rewritten, preempted requests recompute, and
    prefix-cache hits skip blocks: outputs stay the non-speculative ones."""
    check_tight_cache(model_dir, plain, prompts, NGRAM, 12 * BLOCK_BYTES)


def check_tight_cache(model_dir, plain, prompts, speculative_config, kv_bytes) -> None:
    """Four 60-token prompts in 12 blocks' worth of KV (preemptions), then the first
    again (a prefix-cache hit): the tokens are the non-speculative ones."""
    short = [p[:60] for p in prompts[2:6]]
    tight = make_llm(model_dir, max_model_len=128, speculative_config=speculative_config,
                     disable_log_stats=False, kv_cache_memory_bytes=kv_bytes)
    try:
        together = [list(o.token_ids) for o in generate(tight, short, greedy())]
        preemptions = counter(tight, "vllm:num_preemptions")
        again = generate(tight, short[:1], greedy())[0]
    finally:
        shutdown_llm(tight)
    reference = [list(o.token_ids) for o in generate(plain, short, greedy())]
    assert preemptions > 0
    assert together == reference
    assert list(again.token_ids) == reference[0]


@pytest.fixture(scope="module")
def draft_config(model_dir, tmp_path_factory) -> dict:
    skip_one = layer_subset(tmp_path_factory.mktemp("draft") / "skip15", model_dir,
                            [i for i in range(30) if i != 15])
    return {"method": "draft_model", "model": skip_one, "num_speculative_tokens": 4}


@pytest.fixture(scope="module")
def drafted(model_dir, draft_config):
    engine = make_llm(model_dir, speculative_config=draft_config, disable_log_stats=False)
    yield engine
    shutdown_llm(engine)


def test_draft_model_greedy_equals_non_speculative_batched_and_alone(plain, drafted,
                                                                     prompts):
    reference = [list(o.token_ids) for o in generate(plain, prompts, greedy())]
    drafts_before = counter(drafted, "vllm:spec_decode_num_draft_tokens")
    accepted_before = counter(drafted, "vllm:spec_decode_num_accepted_tokens")
    together = [list(o.token_ids) for o in generate(drafted, prompts, greedy())]
    drafted_n = counter(drafted, "vllm:spec_decode_num_draft_tokens") - drafts_before
    accepted = counter(drafted, "vllm:spec_decode_num_accepted_tokens") - accepted_before
    print(f"drafted {drafted_n:.0f}, accepted {accepted:.0f}")
    assert together == reference
    assert NEW_TOKENS < accepted < drafted_n  # some steps keep drafts, others reject them
    alone = [list(generate(drafted, [p], greedy())[0].token_ids) for p in prompts[::3]]
    assert alone == reference[::3]


def test_draft_model_logprobs_and_seeded_sampling(plain, drafted, prompts):
    params = greedy(24, logprobs=3)
    ref, got = generate(plain, prompts[:3], params), generate(drafted, prompts[:3], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    for a, b in zip(got, ref):
        for pa, pb in zip(a.logprobs, b.logprobs):
            assert pa.keys() == pb.keys()
            assert max(abs(pa[t].logprob - pb[t].logprob) for t in pa) < 1e-3
    seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=24,
                            ignore_eos=True)
    first = [o.token_ids for o in generate(drafted, prompts[:3], seeded)]
    assert first == [o.token_ids for o in generate(drafted, prompts[:3], seeded)]


def test_draft_model_under_prefix_hits_and_preemption(model_dir, plain, prompts,
                                                      draft_config):
    """A preempted request's draft KV is rebuilt in its new blocks; a prefix-cache hit
    reuses only the blocks the draft itself filled with the same tokens."""
    draft_block = 16 * 2 * 29 * 3 * 64 * 4
    check_tight_cache(model_dir, plain, prompts, draft_config,
                      12 * (BLOCK_BYTES + draft_block))
