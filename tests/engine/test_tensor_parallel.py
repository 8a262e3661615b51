"""Tensor parallelism across raylets on distinct loopback addresses (MLX ring)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from vllm_ray_metal.testing import scenarios
from vllm_ray_metal.testing.cluster import LocalRayCluster
from vllm_ray_metal.testing.llm import config_error
from vllm_ray_metal.testing.models import hf_greedy
from vllm_ray_metal.testing.structured import json_rows_start_with_a_brace

NEW_TOKENS = 32
DRAFTS_EVERY_STEP = {"VLLM_RAY_METAL_SPEC_DRAFTS": "always"}  # verification every step


def generate(c: LocalRayCluster, model: str, llm: dict, jobs: list[dict]) -> dict:
    return scenarios.run("gen", c, "class", {"model": model, "jobs": jobs, "llm": llm}).ok()


def assert_ranks_split_the_model(res: dict, tp1: dict, tp: int) -> None:
    workers = res["workers"]
    assert [w["rank"] for w in workers] == list(range(tp))
    assert len({w["host_ip"] for w in workers}) == tp  # one rank per raylet address
    assert all(w["group_size"] == tp for w in workers)
    assert all(w["vocab_split"] for w in workers)  # each rank projects onto 1/tp of the vocab
    # each rank holds 1/tp of the decoder weights (embeddings stay replicated)
    full = tp1["workers"][0]["layer_weight_bytes"]
    for w in workers:
        assert abs(w["layer_weight_bytes"] - full / tp) / (full / tp) < 0.02


@pytest.mark.ray
@pytest.mark.core
def test_tp2_equals_tp1_plain_constrained_and_at_2k_tokens(four_units, tiny, tiny_jobs,
                                                          tiny_llm, tiny_tp1):
    """TP=2 gives TP=1's tokens for the chat prompts; under JSON schemas (the bitmask
    reaches every rank, applied to the vocabulary-gathered logits); for ~2k-token
    prompts (chunked, in pieces, on the KV mirror); and on two LoRA adapters and the base
    model in one batch (each rank holds its shard of every adapter)."""
    res = generate(four_units, tiny, {**tiny_llm, "tensor_parallel_size": 2}, tiny_jobs)
    plain, constrained, long, adapted = res["jobs"]
    assert plain == tiny_tp1["jobs"][0]
    assert all(len(o) == NEW_TOKENS for o in plain + long)
    assert constrained == tiny_tp1["jobs"][1]
    assert json_rows_start_with_a_brace(tiny, constrained, tiny_jobs[1]["json_schemas"])
    assert long == tiny_tp1["jobs"][2]
    assert adapted == tiny_tp1["jobs"][3]
    base = tiny_tp1["jobs"][0]
    for i, loras in enumerate(tiny_jobs[3]["loras"]):  # base rows: the plain job's tokens
        if loras is None:
            assert adapted[i] == base[i % len(base)]
    assert sum(adapted[i] != base[i % len(base)] for i in range(len(adapted))) >= 4
    assert_ranks_split_the_model(res, tiny_tp1, 2)
    one = tiny_tp1["workers"][0]["lora_bytes"]
    assert 0 < res["workers"][0]["lora_bytes"] < one  # the slots are sharded too


@pytest.mark.ray
def test_tp4_equals_tp1_with_ranks_on_different_nodes(four_units, tiny, tiny_jobs, tiny_llm,
                                                      tiny_tp1):
    res = generate(four_units, tiny, {**tiny_llm, "tensor_parallel_size": 4}, tiny_jobs[:1])
    assert res["jobs"][0] == tiny_tp1["jobs"][0]
    assert_ranks_split_the_model(res, tiny_tp1, 4)


@pytest.mark.ray
def test_tp3_on_default_model_with_speculation_equals_reference(four_units, model_dir,
                                                                prompts, hf_reference):
    """SmolLM2 (9 heads / 3 KV heads) at TP=3 gives transformers' (= our TP=1) tokens,
    with n-gram speculation on: every rank verifies the same drafts alike (same logits
    after the vocabulary gather, same generators)."""
    accepted = "vllm:spec_decode_num_accepted_tokens"
    res = scenarios.run("gen", four_units, "class", {
        "model": model_dir, "prompts": prompts, "max_tokens": NEW_TOKENS,
        "metrics": [accepted],
        "llm": {"tensor_parallel_size": 3, "disable_log_stats": False,
                "speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                       "prompt_lookup_min": 1, "prompt_lookup_max": 3}}},
        env=DRAFTS_EVERY_STEP).ok()
    assert res["outputs"] == [hf_greedy(hf_reference, p, NEW_TOKENS) for p in prompts]
    assert res["metrics"][accepted] > 0
    # the drafts came back with each step's output, not through a second RPC a step
    assert [w["draft_rpcs"] for w in res["workers"]] == [0, 0, 0]
    assert len({w["host_ip"] for w in res["workers"]}) == 3
    assert all(w["vocab_split"] for w in res["workers"])


@pytest.mark.ray
def test_tp3_with_the_model_as_its_own_draft_equals_reference(four_units, model_dir,
                                                              prompts, hf_reference):
    """Draft-model speculation at TP=3: each rank runs the whole draft (replicated) and
    the sharded target verifies; the model as its own draft proposes exactly what the
    target then samples, so every proposal is accepted."""
    names = ["vllm:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_draft_tokens"]
    res = scenarios.run("gen", four_units, "class", {
        "model": model_dir, "prompts": prompts, "max_tokens": NEW_TOKENS, "metrics": names,
        "llm": {"tensor_parallel_size": 3, "disable_log_stats": False,
                "speculative_config": {"method": "draft_model", "model": model_dir,
                                       "draft_tensor_parallel_size": 1,
                                       "num_speculative_tokens": 3}}},
        env=DRAFTS_EVERY_STEP).ok()
    assert res["outputs"] == [hf_greedy(hf_reference, p, NEW_TOKENS) for p in prompts]
    accepted, drafted = (res["metrics"][n] for n in names)
    assert accepted == drafted > NEW_TOKENS
    assert all(w["draft_bytes"] > 0 and w["draft_rpcs"] == 0 for w in res["workers"])


@pytest.mark.unit
def test_tp_not_dividing_kv_heads_names_valid_sizes(tiny):
    msg = config_error(tiny, max_model_len=256, tensor_parallel_size=8)
    assert "valid sizes: 1, 2, 4" in msg


@pytest.mark.unit
def test_model_family_without_shard_is_rejected(tmp_path, model_dir):
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_head": 4,
           "n_embd": 64, "n_layer": 2, "vocab_size": 49152, "n_positions": 512}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"wte.weight": np.zeros((1, 1), np.float32)}, str(tmp_path / "model.safetensors"))
    for f in Path(model_dir).glob("tokenizer*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    msg = config_error(str(tmp_path), max_model_len=256, tensor_parallel_size=2)
    assert "has no shard() method" in msg


@pytest.mark.ray
def test_more_ranks_than_units_fails_fast(tiny, prompts):
    with LocalRayCluster([("127.0.0.16", {}), ("127.0.0.17", {"METAL": 1})]) as c:
        opts = {"model": tiny, "prompts": prompts[:1], "llm": {"tensor_parallel_size": 2}}
        res = scenarios.run("gen", c, "class", opts, timeout=300).result
    assert res["error"].startswith("PlacementError") and res["error_s"] < 10
    assert "1 unit(s) of 'METAL'" in res["error"] and "127.0.0.17" in res["error"]


@pytest.mark.ray
def test_tp2_embeddings_equal_transformers(four_units, tiny):
    """Every rank holds the full hidden state after the decoder's all-reduce, so pooled
    embeddings at TP=2 are transformers' (the last token's normed hidden state, L2-normed)
    up to the order of fp32 sums."""
    import torch
    from transformers import AutoTokenizer

    from vllm_ray_metal.testing.models import hf_model

    texts = ["The capital of France is Paris.", "hello", "Mountains rise above the valley."]
    two = scenarios.run("gen", four_units, "class", {
        "model": tiny, "embed": texts,
        "llm": {"runner": "pooling", "tensor_parallel_size": 2}}).ok()
    assert len(two["workers"]) == 2
    tok, ref_model = AutoTokenizer.from_pretrained(tiny), hf_model(tiny)
    with torch.no_grad():
        want = [torch.nn.functional.normalize(ref_model.model(torch.tensor(
            [tok(t)["input_ids"]])).last_hidden_state[0, -1], dim=-1).numpy() for t in texts]
    for got, ref in zip(np.asarray(two["embeddings"]), want):
        assert got @ ref / np.linalg.norm(got) / np.linalg.norm(ref) >= 0.9999
    np.testing.assert_allclose(two["embeddings"], want, atol=2e-3)
