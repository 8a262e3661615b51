"""`vllm serve --speculative-config` (n-gram, and a draft model: the served model as its
own draft): served tokens equal transformers' greedy decoding, proposals are accepted
and counted on /metrics, constrained output stays valid."""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from vllm_ray_metal.testing.models import chat_token_ids, hf_greedy
from vllm_ray_metal.testing.serve import metric, post, served
from vllm_ray_metal.testing.structured import PROMPTS, WEATHER

pytestmark = pytest.mark.serve
NEW_TOKENS = 32
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
         "prompt_lookup_max": 4}
PASSAGE = ("The lighthouse keeper climbed the stairs every evening, lit the lamp, wrote the "
           "weather in his book and watched the ships pass the rocks until morning.")


@pytest.fixture(scope="module", params=["ngram", "draft_model"])
def speculating(request, model_dir, tmp_path_factory):
    config = NGRAM if request.param == "ngram" else {
        "method": "draft_model", "model": model_dir, "num_speculative_tokens": 3}
    log = tmp_path_factory.mktemp("serve-spec") / "serve.log"
    with contextlib.ExitStack() as stack:
        kv_mib = 32 if request.param == "ngram" else 64  # the draft's pool takes half
        yield stack.enter_context(served(model_dir, log, "127.0.0.62", "127.0.0.63", kv_mib,
                                         "--speculative-config", json.dumps(config),
                                         env={"VLLM_RAY_METAL_SPEC_DRAFTS": "always"}))


def test_served_speculation_equals_transformers_and_accepts_drafts(speculating, model_dir,
                                                                   hf_reference):
    base = speculating.base
    prompts = chat_token_ids(model_dir, [f"Repeat this text word for word: {PASSAGE}",
                                         f"Quote the first sentence: {PASSAGE}",
                                         "What is the capital of France?"])
    accepted = "vllm:spec_decode_num_accepted_tokens_total"
    before = metric(base, accepted)

    def complete(ids: list[int]) -> list[int]:
        out = post(f"{base}/v1/completions", {
            "model": "smollm2", "prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True})
        return out["choices"][0]["token_ids"]

    with ThreadPoolExecutor(len(prompts)) as pool:  # batched verification
        got = list(pool.map(complete, prompts))
    assert got == [hf_greedy(hf_reference, p, NEW_TOKENS) for p in prompts]
    assert metric(base, accepted) - before > 0


def test_served_speculation_keeps_json_schema_output_valid(speculating):
    out = post(f"{speculating.base}/v1/chat/completions", {
        "model": "smollm2", "temperature": 0.0, "max_tokens": 120,
        "messages": [{"role": "user", "content": PROMPTS["weather"]}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "weather", "schema": WEATHER}}})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), WEATHER)
