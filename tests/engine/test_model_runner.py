"""End-to-end correctness of the MLX runner under vLLM's scheduler, on the default model.

The reference is transformers (torch) on the same fp32 weights: an implementation that
shares no code with mlx-lm or this package.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_ray_metal.testing.llm import make_llm, shutdown_llm
from vllm_ray_metal.testing.models import CHAT_PROMPTS, chat_token_ids, hf_greedy

pytestmark = pytest.mark.engine
NEW_TOKENS = 32
STORY = "Mountains rise above the valley where farmers grow wheat and barley. "


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = make_llm(model_dir, max_num_batched_tokens=256)  # forces chunked prefill
    yield engine
    shutdown_llm(engine)


@pytest.fixture(scope="module")
def hf_model(hf_reference):
    return hf_reference


def greedy(n: int = NEW_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def generate_ids(llm, prompts: list[list[int]], params) -> list[list[int]]:
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_greedy_matches_transformers(llm, hf_model, model_dir):
    prompts = chat_token_ids(model_dir, CHAT_PROMPTS)
    ours = generate_ids(llm, prompts, greedy())
    for ids, got in zip(prompts, ours):
        assert got == hf_greedy(hf_model, ids, NEW_TOKENS)


def test_the_worker_runs_with_the_tuned_blas(llm):
    """Tuning on (Linux): MLX bound to the shim's OpenBLAS (or MKL without a compiler)."""
    import sys

    from vllm_ray_metal import cpu

    (info,) = llm.collective_rpc("node_info")
    if cpu.tuning() == "1" and sys.platform.startswith("linux"):
        assert "openblas" in info["cpu_setup"] or "mkl" in info["cpu_setup"], info


def test_capital_of_france(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text


def _mixed_prompts(model_dir) -> list[list[int]]:
    base = chat_token_ids(model_dir, CHAT_PROMPTS)
    long_text = " ".join(f"Item {i} is a {c}." for i, c in
                         enumerate(["red apple", "blue car", "green tree", "grey cat"] * 15))
    longer = chat_token_ids(model_dir, [long_text + " Summarise.",
                                        "Hi", "Count from one to twenty in words.",
                                        long_text[:300] + " Which item is the cat?"])
    return base + longer


def test_batched_equals_alone(llm, model_dir):
    prompts = _mixed_prompts(model_dir)
    assert len(prompts) == 8 and max(map(len, prompts)) > 256  # one needs several chunks
    together = generate_ids(llm, prompts, greedy())
    alone = [generate_ids(llm, [p], greedy())[0] for p in prompts]
    assert together == alone


def test_prefix_cache_hits_and_same_output(llm, model_dir):
    text = "Here is a long document. " + " ".join(f"Fact {i}: {i} squared is {i*i}."
                                                  for i in range(40))
    prompt = chat_token_ids(model_dir, [text + " What is fact 7?"])[0]
    params = greedy(16)
    first = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
    second = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    assert (second.num_cached_tokens or 0) >= 16 * (len(prompt) // 16) - 16
    assert (second.num_cached_tokens or 0) > (first.num_cached_tokens or 0)


def test_same_step_prefix_hits_read_written_blocks(hf_model, model_dir, monkeypatch):
    """Copies of one prompt admitted together hit the blocks the first copy fills.

    vLLM registers those blocks when it schedules them, so with ``n * 16 + 1`` prompt
    tokens the copies arrive in the same step as one-token rows that read blocks written
    by the first copy's prefill (they came out as garbage when they ran first). The
    engine core and worker run in this process, so all copies are queued before the
    first step, and the runner's forwards can be recorded.
    """
    import vllm.envs
    from vllm_ray_metal.engine.model_runner import MLXModelRunner

    forwards: list[list[tuple[int, int]]] = []
    plain = MLXModelRunner._forward_groups

    def recorded(self, rows):
        groups = plain(self, rows)
        forwards.extend([(r.start, r.count) for r in g] for g in groups)
        return groups

    monkeypatch.setattr(MLXModelRunner, "_forward_groups", recorded)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engine = make_llm(model_dir, max_model_len=256)
    try:
        tok = engine.get_tokenizer()
        prompts = [tok.encode(STORY * 2)[:17], tok.encode("Once upon a time, " + STORY * 3)[:33]]
        outs = [engine.generate([TokensPrompt(prompt_token_ids=p)] * 3, greedy(8),
                                use_tqdm=False) for p in prompts]
    finally:
        shutdown_llm(engine)
        vllm.envs.disable_envs_cache()  # the in-process engine froze VLLM_* for this process
    for p, group in zip(prompts, outs):
        n = len(p)
        assert n in (17, 33)
        assert [(0, n)] in forwards and [(n - 1, 1), (n - 1, 1)] in forwards  # same step
        assert [o.num_cached_tokens or 0 for o in group] == [0, n - 1, n - 1]
        assert [list(o.outputs[0].token_ids) for o in group] == [hf_greedy(hf_model, p, 8)] * 3


def test_seeded_sampling_is_reproducible(llm, model_dir):
    prompt = chat_token_ids(model_dir, ["Tell me a story about a dragon."])
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.02, seed=1234,
                            max_tokens=24)
    a = generate_ids(llm, prompt, params)
    b = generate_ids(llm, prompt * 3, params)  # batch company must not change the draws
    assert all(x == a[0] for x in b)
    other = generate_ids(llm, prompt, SamplingParams(temperature=1.0, seed=99, max_tokens=24))
    assert other[0] != a[0]


def test_logprobs_match_reference(llm, hf_model, model_dir):
    ids = chat_token_ids(model_dir, ["Name a famous painter."])[0]
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                       greedy(8, logprobs=5, prompt_logprobs=3), use_tqdm=False)[0]
    gen = list(out.outputs[0].token_ids)
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids + gen])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1).numpy()
    for step, (tok, entry) in enumerate(zip(gen, out.outputs[0].logprobs)):
        row = ref[len(ids) - 1 + step]
        assert abs(entry[tok].logprob - row[tok]) < 1e-3
        top5 = np.argsort(-row)[:5]
        for t in top5:  # top-5 ids agree (up to near-ties) and values agree
            if t in entry:
                assert abs(entry[int(t)].logprob - row[t]) < 1e-3
        assert len(entry) >= 5
        assert entry[tok].rank == 1  # greedy picks the top token
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[ids[pos]].logprob - ref[pos - 1][ids[pos]]) < 1e-3


def test_prompt_longer_than_max_model_len_is_rejected(llm):
    with pytest.raises(Exception, match=r"maximum context length is 1024"):
        llm.generate([TokensPrompt(prompt_token_ids=[1] * 1500)], greedy(4), use_tqdm=False)
    # the engine still serves afterwards
    assert generate_ids(llm, [[1, 2, 3]], greedy(2))[0]


def test_preemption_keeps_outputs(model_dir):
    prompts = _mixed_prompts(model_dir)
    tight = make_llm(model_dir, max_model_len=512, kv_cache_memory_bytes=24 << 20,
                     disable_log_stats=False)
    try:
        short = [p[:200] for p in prompts]
        params = greedy(48)
        together = generate_ids(tight, short, params)
        preemptions = sum(m.value for m in tight.get_metrics()
                          if m.name == "vllm:num_preemptions")
        alone = [generate_ids(tight, [p], params)[0] for p in short]
    finally:
        shutdown_llm(tight)
    assert preemptions > 0
    assert together == alone


def test_unsupported_requests_raise_fast_and_the_engine_keeps_serving(llm):
    """What the runner cannot honour is refused before scheduling, naming what to change;
    nothing reaches a worker, so the engine serves the next request."""
    import time

    from vllm.lora.request import LoRARequest

    cases = [
        (lambda: llm.generate("hi", greedy(2), lora_request=LoRARequest("a", 1, "/tmp/a"),
                              use_tqdm=False), "LoRA is not enabled"),
        (lambda: llm.generate({"prompt_embeds": torch.zeros(3, 576)}, greedy(2),
                              use_tqdm=False), "enable-prompt-embeds"),
        (lambda: llm.generate({"prompt": "hi", "multi_modal_data": {"image": None}},
                              greedy(2), use_tqdm=False), "text-only models"),
        (lambda: llm.embed(["hi"], use_tqdm=False), "--runner pooling"),
    ]
    for call, needle in cases:
        t0 = time.perf_counter()
        with pytest.raises(Exception) as err:
            call()
        took = time.perf_counter() - t0
        print(f"{needle}: {type(err.value).__name__} in {took:.3f}s: {str(err.value)[:160]}")
        assert needle.lower() in str(err.value).lower()
        assert took < 1.0
        assert generate_ids(llm, [[1, 2, 3]], greedy(2))[0]
