"""Long contexts under vLLM's scheduler: prompts of thousands of tokens, chunked prefill
in pieces, batches of ragged long rows on the KV mirror, prefix-cache hits and preemption.

The reference is transformers on the same fp32 weights, or the same request run alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_ray_metal.testing.llm import make_llm, shutdown_llm
from vllm_ray_metal.testing.models import hf_greedy

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def generate_ids(llm, prompts: list[list[int]], n: int) -> list[list[int]]:
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy(n),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def corpus(model_dir) -> list[int]:
    """The README as tokens: real prose, long enough for every prompt below."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok((ROOT / "README.md").read_text(), add_special_tokens=False)["input_ids"]
    assert len(ids) > 3200
    return ids


@pytest.fixture(scope="module")
def llm(model_dir):
    # chunks of 2048 tokens (run in pieces of 512); no prefix caching, so a request run
    # alone recomputes everything
    engine = make_llm(model_dir, max_model_len=4096, max_num_batched_tokens=2048,
                      enable_prefix_caching=False, kv_cache_memory_bytes=1 << 30)
    yield engine
    shutdown_llm(engine)


def test_3k_token_prompt_matches_transformers(llm, corpus, hf_reference):
    prompt = corpus[:3000]
    (got,) = generate_ids(llm, [prompt], 32)
    assert got == hf_greedy(hf_reference, prompt, 32)


def test_long_prompts_batched_equal_each_alone(llm, corpus):
    # ragged lengths: rows of different contexts share the decode forward (a mask), and
    # rows finish at different steps (holes in the mirror's slots)
    prompts = [corpus[97 * i:97 * i + 420 + 120 * i] for i in range(5)]
    lengths = [12 + 3 * i for i in range(5)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        [greedy(n) for n in lengths], use_tqdm=False)
    together = [list(o.outputs[0].token_ids) for o in outs]
    alone = [generate_ids(llm, [p], n)[0] for p, n in zip(prompts, lengths)]
    assert together == alone
    assert [len(t) for t in together] == lengths


def test_prefix_hits_and_preemption_at_long_context_keep_outputs(model_dir, corpus,
                                                                  monkeypatch):
    # four requests share a 1,200-token prefix; the pool holds 97 blocks of 16 tokens
    # (the minimum for max_model_len), so their tails and outputs do not all fit at once:
    # the scheduler preempts and recomputes, on prefix-cache hits
    monkeypatch.setenv("VLLM_RAY_METAL_KV_MIRROR", "0.9")
    block_bytes = 16 * 2 * 30 * 3 * 64 * 4
    tight = make_llm(model_dir, max_model_len=1536, max_num_batched_tokens=1536,
                     kv_cache_memory_bytes=500 * block_bytes, disable_log_stats=False)
    prefix = corpus[:1200]
    prompts = [prefix + corpus[1300 + 80 * i:1360 + 80 * i] for i in range(4)]
    try:
        together = generate_ids(tight, prompts, 40)
        preemptions = sum(m.value for m in tight.get_metrics()
                          if m.name == "vllm:num_preemptions")
        hits = tight.generate([TokensPrompt(prompt_token_ids=prompts[0])], greedy(40),
                              use_tqdm=False)[0]
        alone = [generate_ids(tight, [p], 40)[0] for p in prompts]
    finally:
        shutdown_llm(tight)
    assert preemptions > 0
    assert (hits.num_cached_tokens or 0) >= 1184
    assert list(hits.outputs[0].token_ids) == together[0]
    assert together == alone
