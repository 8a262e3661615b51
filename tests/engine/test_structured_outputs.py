"""Structured outputs offline: vLLM's grammar bitmask applied by the MLX runner.

Outputs are checked by an independent validator (``jsonschema``, ``re``); the bitmask
itself is checked in test_grammar.py; every backend vLLM offers runs the same
requests, since the mask they send is backend-neutral.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.inputs import TokensPrompt
from vllm.sampling_params import StructuredOutputsParams

from vllm_ray_metal.testing.llm import make_llm, shutdown_llm
from vllm_ray_metal.testing.models import CHAT_PROMPTS, chat_token_ids
from vllm_ray_metal.testing.structured import (JSON_SCHEMAS, PHONE_REGEX, PROMPTS,
                                               YES_NO_GRAMMAR)

pytestmark = pytest.mark.engine


def chat(llm, prompts: list[str], params) -> list:
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                    use_tqdm=False)
    return [o.outputs[0] for o in outs]


def backend(llm) -> str:
    return llm.llm_engine.vllm_config.structured_outputs_config.backend


def json_params(schema: dict, temperature: float, seed: int = 0) -> SamplingParams:
    return SamplingParams(max_tokens=160, temperature=temperature, seed=seed,
                          structured_outputs=StructuredOutputsParams(json=schema))


@pytest.fixture(scope="module", params=["xgrammar", "guidance", "outlines"])
def llm(request, model_dir):
    engine = make_llm(model_dir, structured_outputs_config={"backend": request.param})
    yield engine
    shutdown_llm(engine)


def without_integer_bounds(schema):
    """outlines-core compiles integer ``minimum``/``maximum`` to any integer (its
    limitation, not the runner's); the rest of the schema still binds."""
    if isinstance(schema, dict):
        return {k: without_integer_bounds(v) for k, v in schema.items()
                if not (schema.get("type") == "integer" and k in ("minimum", "maximum"))}
    return schema


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_json_schemas_validate(llm, temperature):
    outlines = backend(llm) == "outlines"
    names = list(JSON_SCHEMAS)
    params = [json_params(JSON_SCHEMAS[n], temperature, seed=i) for i, n in enumerate(names)]
    for name, out in zip(names, chat(llm, [PROMPTS[n] for n in names], params)):
        print(name, repr(out.text))
        assert out.finish_reason == "stop", (name, out.text)
        schema = JSON_SCHEMAS[name]
        jsonschema.validate(json.loads(out.text),
                            without_integer_bounds(schema) if outlines else schema)


def test_choice_and_regex(llm):
    choices = ["Paris", "London", "Rome"]
    params = [
        SamplingParams(max_tokens=10, temperature=0.8, seed=3,
                       structured_outputs=StructuredOutputsParams(choice=choices)),
        SamplingParams(max_tokens=20, temperature=0.8, seed=4,
                       structured_outputs=StructuredOutputsParams(regex=PHONE_REGEX)),
    ]
    outs = chat(llm, ["What is the capital of France?", "Give me a phone number."], params)
    assert outs[0].text in choices
    assert re.fullmatch(PHONE_REGEX, outs[1].text), outs[1].text


def test_json_object(llm):
    params = SamplingParams(max_tokens=120, temperature=0.0,
                            structured_outputs=StructuredOutputsParams(json_object=True))
    ask = ["Reply with a JSON object that has one key, colour."]
    if backend(llm) == "outlines":
        with pytest.raises(VLLMValidationError, match="json_object"):  # vLLM refuses it
            chat(llm, ask, params)
        return
    out = chat(llm, ask, params)[0]
    assert out.finish_reason == "stop", out.text
    assert isinstance(json.loads(out.text), dict)


GRAMMARS = {  # the same language in each backend's grammar syntax
    "xgrammar": YES_NO_GRAMMAR,  # EBNF
    "guidance": 'start: ("yes" | "no") ", because " /[a-z ]{1,30}/ "."',  # Lark
}


def test_grammar(llm):
    name = backend(llm)
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=5,
                            structured_outputs=StructuredOutputsParams(
                                grammar=GRAMMARS.get(name, YES_NO_GRAMMAR)))
    ask = ["Is the sky blue? Answer and say why."]
    if name not in GRAMMARS:
        with pytest.raises(VLLMValidationError, match="grammar"):  # vLLM refuses it
            chat(llm, ask, params)
        return
    text = chat(llm, ask, params)[0].text
    assert re.fullmatch(r"(yes|no), because [a-z ]{1,30}\.", text), text


def test_constrained_requests_leave_unconstrained_ones_alone(llm, model_dir):
    prompts = chat_token_ids(model_dir, CHAT_PROMPTS[:3])
    free = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=24, temperature=0.8, seed=11, ignore_eos=True)
    alone = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                         [free, free, sampled], use_tqdm=False)
    names = list(JSON_SCHEMAS)
    asks = chat_token_ids(model_dir, [PROMPTS[n] for n in names])
    constrained = [json_params(JSON_SCHEMAS[n], 0.0) for n in names]
    mixed = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts + asks],
                         [free, free, sampled, *constrained], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == \
        [o.outputs[0].token_ids for o in alone]
    outlines = backend(llm) == "outlines"
    for o, name in zip(mixed[3:], names):
        schema = JSON_SCHEMAS[name]
        jsonschema.validate(json.loads(o.outputs[0].text),
                            without_integer_bounds(schema) if outlines else schema)


def test_chunked_prefill_and_preemption_keep_constraints(model_dir):
    """Long prompts prefilled in chunks, and requests preempted for KV blocks, still
    produce valid documents (the bitmask reaches only rows that sample). Greedy: the
    documents finish within the budget (asserted by parsing them)."""
    # 24 MiB holds 32 blocks of 16 tokens: three prefilled requests fill it, so the
    # decoding ones need blocks others hold
    engine = make_llm(model_dir, max_model_len=512, max_num_batched_tokens=128,
                      kv_cache_memory_bytes=24 << 20, max_num_seqs=16, disable_log_stats=False)
    try:
        names = list(JSON_SCHEMAS) * 4
        long = "Here is a long note about nothing in particular. " * 12  # ~10 blocks
        params = [json_params(JSON_SCHEMAS[n], 0.0) for n in names]
        outs = chat(engine, [long + PROMPTS[n] for n in names], params)
        for name, out in zip(names, outs):
            jsonschema.validate(json.loads(out.text), JSON_SCHEMAS[name])
        stats = engine.llm_engine.get_metrics()
        preempted = sum(m.value for m in stats if m.name == "vllm:num_preemptions")
        print("preemptions", preempted)
        assert preempted > 0, "the KV budget did not force a preemption"
    finally:
        shutdown_llm(engine)
