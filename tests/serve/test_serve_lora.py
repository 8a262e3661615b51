"""LoRA through `vllm serve` (the shared server: --enable-lora, --lora-modules peft=... mlx=...,
run-time loading allowed): adapters as `model`, /v1/models, load/unload, bad adapters."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_ray_metal.testing import lora
from vllm_ray_metal.testing.models import CHAT_PROMPTS, chat_token_ids
from vllm_ray_metal.testing.serve import post, post_error

pytestmark = pytest.mark.serve
NEW_TOKENS = 16


def complete(base: str, model: str, ids: list[int]) -> list[int]:
    out = post(f"{base}/v1/completions", {
        "model": model, "prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0.0,
        "ignore_eos": True, "return_token_ids": True})
    return out["choices"][0]["token_ids"]


def models(base: str) -> dict[str, dict]:
    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as resp:
        return {m["id"]: m for m in json.loads(resp.read())["data"]}


def post_text(url: str, body: dict) -> str:
    """POST that must succeed with a plain-text answer (the LoRA load/unload routes)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        return resp.read().decode()


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    return chat_token_ids(model_dir, CHAT_PROMPTS[:2])


def test_adapters_as_models_equal_their_references_in_one_mixed_batch(server, model_dir,
                                                                      served_adapters,
                                                                      prompts):
    listed = models(server.base)
    assert {"smollm2", "peft", "mlx"} <= set(listed)
    assert listed["peft"]["parent"] == "smollm2"
    want = {"peft": lora.peft_greedy(model_dir, served_adapters["peft"], prompts, NEW_TOKENS),
            "mlx": lora.mlx_lm_greedy(model_dir, served_adapters["mlx"], prompts,
                                      NEW_TOKENS)}
    jobs = [(name, i) for name in ("peft", "mlx", "smollm2") for i in range(len(prompts))]
    with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: adapters and base share steps
        got = list(pool.map(lambda j: complete(server.base, j[0], prompts[j[1]]), jobs))
    for (name, i), tokens in zip(jobs, got):
        if name in want:
            assert tokens == want[name][i], name
    base = [t for (name, _), t in zip(jobs, got) if name == "smollm2"]
    assert any(a != b for a, b in zip(got, base))  # the adapters change the output


def test_run_time_load_use_unload_and_bad_adapters(server, model_dir, prompts,
                                                   tmp_path):
    path = lora.peft_adapter(tmp_path / "late", model_dir, rank=4, targets=lora.ATTENTION,
                             rslora=True, seed=5, size=0.3)
    assert post_text(f"{server.base}/v1/load_lora_adapter",
                     {"lora_name": "late", "lora_path": path}).startswith("Success")
    assert "late" in models(server.base)
    assert complete(server.base, "late", prompts[0]) == \
        lora.peft_greedy(model_dir, path, prompts[:1], NEW_TOKENS)[0]

    # bad adapters (a missing directory too): 400, fast, naming the problem,
    # while a request on an adapter runs
    big = lora.peft_adapter(tmp_path / "rank16", model_dir, rank=16, targets=["q_proj"])
    other_shape = tmp_path / "other"
    lora.peft_adapter(other_shape, _tiny(model_dir, tmp_path), targets=["q_proj"])
    cases = [(big, 400, "--max-lora-rank"), (str(other_shape), 400, "another base model"),
             (str(tmp_path / "missing"), 400, "no such directory")]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(complete, server.base, "peft", prompts[1])
        for i, (bad, status, needle) in enumerate(cases):
            started = time.perf_counter()
            code, text = post_error(f"{server.base}/v1/load_lora_adapter",
                                    {"lora_name": f"bad{i}", "lora_path": bad})
            assert (code, needle in text) == (status, True), text
            assert "Internal server error" not in text
            assert time.perf_counter() - started < 5
        assert len(running.result(timeout=120)) == NEW_TOKENS
    assert not {f"bad{i}" for i in range(len(cases))} & set(models(server.base))

    assert post_text(f"{server.base}/v1/unload_lora_adapter",
                     {"lora_name": "late"}).startswith("Success")
    assert "late" not in models(server.base)
    code, text = post_error(f"{server.base}/v1/completions",
                            {"model": "late", "prompt": "Hi", "max_tokens": 2})
    assert code == 404 and "late" in text


def _tiny(model_dir: str, where) -> str:
    from vllm_ray_metal.testing.models import tiny_llama

    return tiny_llama(where / "tiny", model_dir)
