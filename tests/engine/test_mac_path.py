"""The correctness core at sizes MLX's bundled BLAS affords.

The full run runs this module (marker ``core``) with ``VLLM_RAY_METAL_CPU_TUNING=0``: no
BLAS shim, heap setting or model wrapper, i.e. the code a Mac runs (tests/run_suite.py).
The larger versions of these checks are in test_model_runner.py. Reference: transformers
on the same weights.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import StructuredOutputsParams

from vllm_ray_metal import cpu
from vllm_ray_metal.testing.llm import make_llm, shutdown_llm
from vllm_ray_metal.testing.models import CHAT_PROMPTS, chat_token_ids, hf_greedy
from vllm_ray_metal.testing.structured import PROMPTS, WEATHER

pytestmark = [pytest.mark.engine, pytest.mark.core]
NEW_TOKENS = 16


def greedy(n: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def generate_ids(llm, prompts: list[list[int]], params) -> list[list[int]]:
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = make_llm(model_dir, max_model_len=512, kv_cache_memory_bytes=64 << 20,
                      max_num_batched_tokens=64)  # chunked prefill at these sizes too
    yield engine
    shutdown_llm(engine)


def test_switch_state_reaches_the_worker(llm):
    (info,) = llm.collective_rpc("node_info")
    if cpu.tuning() == "0":
        assert info["cpu_setup"] == "CPU tuning off"  # and so no wrapper either:
        assert "CompiledRMSNorm" not in llm.collective_rpc("get_model_inspection")[0]


def test_greedy_equals_transformers_and_batch_equals_alone(llm, model_dir, hf_reference):
    prompts = chat_token_ids(model_dir, CHAT_PROMPTS[:3])
    together = generate_ids(llm, prompts, greedy())
    assert together == [hf_greedy(hf_reference, p, NEW_TOKENS) for p in prompts]
    assert together == [generate_ids(llm, [p], greedy())[0] for p in prompts]


def test_prefix_cache_hit_gives_the_same_tokens(llm, model_dir):
    text = "Facts: " + " ".join(f"{i} squared is {i * i}." for i in range(12))
    prompt = chat_token_ids(model_dir, [text + " What is 7 squared?"])[0]
    first = llm.generate([TokensPrompt(prompt_token_ids=prompt)], greedy(), use_tqdm=False)[0]
    second = llm.generate([TokensPrompt(prompt_token_ids=prompt)], greedy(), use_tqdm=False)[0]
    assert (second.num_cached_tokens or 0) >= 16 * (len(prompt) // 16) - 16 > 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_grammar_bitmask_binds_one_row_and_leaves_the_other(llm, model_dir):
    """A JSON-schema row (vLLM's default backend) beside a free row in one batch: the
    document validates and the free row decodes what it does alone (the full schema
    set, every backend, is in test_structured_outputs.py)."""
    free_prompt, ask = chat_token_ids(model_dir, [CHAT_PROMPTS[0], PROMPTS["weather"]])
    schema = SamplingParams(temperature=0.0, max_tokens=48,
                            structured_outputs=StructuredOutputsParams(json=WEATHER))
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in (free_prompt, ask)],
                        [greedy(), schema], use_tqdm=False)
    assert outs[1].outputs[0].finish_reason == "stop", outs[1].outputs[0].text
    jsonschema.validate(json.loads(outs[1].outputs[0].text), WEATHER)
    assert list(outs[0].outputs[0].token_ids) == generate_ids(llm, [free_prompt], greedy())[0]


def test_preemption_keeps_outputs(model_dir):
    prompts = [p[:60] for p in chat_token_ids(model_dir, [
        "Describe a walk through a forest in autumn. " * 4,
        "List the planets of the solar system and one fact each. " * 3,
        "Tell a story about a lighthouse keeper. " * 4])]
    # 12 blocks of 16 tokens (SmolLM2: 30 layers x 3 KV heads x 64 x fp32, keys and values):
    # three requests of 60 + 28 tokens need 6 each, so the scheduler preempts and recomputes
    tight = make_llm(model_dir, max_model_len=128, disable_log_stats=False,
                     kv_cache_memory_bytes=12 * 16 * 2 * 30 * 3 * 64 * 4)
    try:
        together = generate_ids(tight, prompts, greedy(28))
        preemptions = sum(m.value for m in tight.get_metrics()
                          if m.name == "vllm:num_preemptions")
        alone = [generate_ids(tight, [p], greedy(28))[0] for p in prompts]
    finally:
        shutdown_llm(tight)
    assert preemptions > 0
    assert together == alone
