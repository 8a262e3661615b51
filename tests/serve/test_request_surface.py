"""The request surface through a real `vllm serve`: structured outputs, tool calls, and a
clear 4xx (never a bare 500) for what a client may send that the runner cannot honour.

Outputs are checked by an independent validator (``jsonschema``, ``re``).
"""

from __future__ import annotations

import base64
import io
import json
import re

import jsonschema
import pytest
import torch

from vllm_ray_metal.testing.serve import post, refusals_that_fail
from vllm_ray_metal.testing.structured import (GET_WEATHER_TOOL, JSON_SCHEMAS, PHONE_REGEX,
                                               PROMPTS)

pytestmark = pytest.mark.serve


def chat(server, content: str, **body) -> dict:
    return post(server.base + "/v1/chat/completions",
                {"model": "smollm2", "messages": [{"role": "user", "content": content}],
                 "max_tokens": 160, **body})["choices"][0]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_response_format_json_schema_validates(server, temperature):
    for i, (name, schema) in enumerate(JSON_SCHEMAS.items()):
        choice = chat(server, PROMPTS[name], temperature=temperature, seed=i,
                      response_format={"type": "json_schema",
                                       "json_schema": {"name": name, "schema": schema}})
        text = choice["message"]["content"]
        assert choice["finish_reason"] == "stop", (name, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_choice_regex_and_completions(server):
    obj = chat(server, "Reply with a JSON object that has one key, colour.", temperature=0,
               response_format={"type": "json_object"})
    assert isinstance(json.loads(obj["message"]["content"]), dict)
    pick = chat(server, "Capital of France?", temperature=0.8, seed=2,
                structured_outputs={"choice": ["Paris", "Lyon", "Nice"]})
    assert pick["message"]["content"] in ("Paris", "Lyon", "Nice")
    phone = chat(server, "A phone number, please.", temperature=0.8, seed=3,
                 structured_outputs={"regex": PHONE_REGEX})
    assert re.fullmatch(PHONE_REGEX, phone["message"]["content"])
    done = post(server.base + "/v1/completions",
                {"model": "smollm2", "prompt": "A person as JSON: ", "max_tokens": 120,
                 "temperature": 0, "structured_outputs": {"json": JSON_SCHEMAS["person"]}})
    jsonschema.validate(json.loads(done["choices"][0]["text"]), JSON_SCHEMAS["person"])


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"])
def test_tool_call_arguments_validate(server, tool_choice):
    choice = chat(server, "What is the weather in Paris?", temperature=0,
                  tools=[GET_WEATHER_TOOL], tool_choice=tool_choice)
    calls = choice["message"]["tool_calls"]
    assert calls, choice
    assert calls[0]["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]),
                        GET_WEATHER_TOOL["function"]["parameters"])


def test_auto_tool_choice_with_parser_answers(server):
    choice = chat(server, "Say hello.", temperature=0, max_tokens=16,
                  tools=[GET_WEATHER_TOOL], tool_choice="auto")
    # with a parser and "auto", the model may answer in text: here it greets, and the
    # parser finds no call in that text
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"] and not choice["message"].get("tool_calls")


def _tensor_b64(tensor: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return base64.b64encode(buf.getvalue()).decode()


PNG_1PX = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
           "AAAABJRU5ErkJggg==")
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
# (endpoint, body, status, words the answer must contain: the field to fix)
BAD = [
    ("v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     400, ["invalid type", "nope"]),
    ("v1/chat/completions", {**CHAT, "structured_outputs": {"regex": "([a-z"}}, 400, ["regex"]),
    ("v1/chat/completions", {**CHAT, "structured_outputs": {"grammar": "root ::= ("}}, 400,
     ["grammar"]),
    ("v1/chat/completions", {**CHAT, "structured_outputs": {"choice": ["a"], "regex": "b"}}, 400,
     ["one"]),
    ("v1/completions", {"model": "smollm2", "max_tokens": 4,
                     "prompt_embeds": _tensor_b64(torch.zeros(3, 576))}, 400,
     ["prompt_embeds", "enable-prompt-embeds"]),
    ("v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_1PX}"}}]}]},
     400, ["not a multimodal model"]),
    ("v1/chat/completions", {**CHAT, "model": "my-lora-adapter"}, 404, ["my-lora-adapter"]),
]


def test_unsupported_requests_answer_4xx_fast_and_the_server_keeps_serving(server):
    def still_serving():
        good = chat(server, "What is the capital of France?", temperature=0, max_tokens=8)
        assert "Paris" in good["message"]["content"]

    wrong = refusals_that_fail(server.base, BAD, still_serving)
    assert not wrong, "\n".join(map(str, wrong))
