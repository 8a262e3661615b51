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

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def four_units():
    # four raylets, one METAL unit each (the head too): every rank gets its own address
    with LocalRayCluster.one_unit_each(12, 13, 14, 15).start(timeout=240) as c:
        yield c


def generate(c: LocalRayCluster, model: str, tp: int, prompts: list[list[int]]) -> dict:
    opts = {"model": model, "prompts": prompts, "max_tokens": NEW_TOKENS,
            "llm": {"tensor_parallel_size": tp}}
    return scenarios.run("gen", c, "class", opts).ok()


@pytest.fixture(scope="module")
def tiny_tp1(four_units, tiny, prompts):
    return generate(four_units, tiny, 1, prompts)


@pytest.mark.ray
@pytest.mark.parametrize("tp", [pytest.param(2, marks=pytest.mark.core), 4])
def test_tp_equals_tp1_with_ranks_on_different_nodes(four_units, tiny, prompts, tiny_tp1, tp):
    res = generate(four_units, tiny, tp, prompts)
    assert res["outputs"] == tiny_tp1["outputs"]
    assert all(len(o) == NEW_TOKENS for o in res["outputs"])
    workers = res["workers"]
    assert [w["rank"] for w in workers] == list(range(tp))
    assert len({w["host_ip"] for w in workers}) == tp  # one rank per raylet address
    assert all(w["group_size"] == tp for w in workers)
    assert all(w["vocab_split"] for w in workers)  # each rank projects onto 1/tp of the vocab
    # each rank holds 1/tp of the decoder weights (embeddings stay replicated)
    full = tiny_tp1["workers"][0]["layer_weight_bytes"]
    for w in workers:
        assert abs(w["layer_weight_bytes"] - full / tp) / (full / tp) < 0.02


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
                                       "prompt_lookup_min": 1, "prompt_lookup_max": 3}}}).ok()
    assert res["outputs"] == [hf_greedy(hf_reference, p, NEW_TOKENS) for p in prompts]
    assert res["metrics"][accepted] > 0
    assert len({w["host_ip"] for w in res["workers"]}) == 3
    assert all(w["vocab_split"] for w in res["workers"])


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


@pytest.fixture(scope="module")
def constrained(tiny, prompts) -> dict:
    """Token prompts with a JSON schema (or None: unconstrained) each, for the tiny model."""
    from vllm_ray_metal.testing.structured import PERSON, TAGS, WEATHER

    cycle = [WEATHER, None, PERSON, TAGS]
    return {"model": tiny, "prompts": prompts, "max_tokens": NEW_TOKENS,
            "json_schemas": [cycle[i % 4] for i in range(len(prompts))]}


@pytest.fixture(scope="module")
def constrained_tp1(four_units, constrained) -> dict:
    return scenarios.run("gen", four_units, "class", {**constrained, "llm": {}}).ok()


@pytest.mark.ray
@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2},
                                      {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_constrained_outputs_equal_tp1(four_units, tiny, constrained, constrained_tp1,
                                       parallel):
    """The grammar bitmask reaches every rank that samples (TP: all ranks, on the
    vocabulary-gathered logits; PP: the last stage), so constrained tokens match TP=1."""
    opts, one = constrained, constrained_tp1
    many = scenarios.run("gen", four_units, "class", {**opts, "llm": parallel}).ok()
    assert many["outputs"] == one["outputs"]
    assert len(many["workers"]) == 2
    # the constrained rows are JSON objects as far as they got (random weights), the
    # free rows are not
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    starts = [tok.decode(out).lstrip()[:1] for out in one["outputs"]]
    assert all((s == "{") == (schema is not None)
               for s, schema in zip(starts, opts["json_schemas"])), starts


@pytest.mark.ray
def test_tp2_embeddings_equal_tp1(four_units, tiny):
    """Every rank holds the full hidden state after the decoder's all-reduce, so pooled
    embeddings at TP=2 equal TP=1's up to the order of fp32 sums (split matmuls)."""
    texts = ["The capital of France is Paris.", "hello", "Mountains rise above the valley."]
    opts = {"model": tiny, "embed": texts}
    one = scenarios.run("gen", four_units, "class", {**opts, "llm": {"runner": "pooling"}}).ok()
    two = scenarios.run("gen", four_units, "class", {
        **opts, "llm": {"runner": "pooling", "tensor_parallel_size": 2}}).ok()
    assert len(two["workers"]) == 2
    for a, b in zip(np.asarray(two["embeddings"]), np.asarray(one["embeddings"])):
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.9999
    np.testing.assert_allclose(two["embeddings"], one["embeddings"], atol=2e-3)


@pytest.mark.ray
def test_tp2_equals_tp1_at_2k_tokens(four_units, tiny, model_dir):
    """Long prompts (chunked, in pieces, on the KV mirror) give TP=1's tokens at TP=2."""
    from transformers import AutoTokenizer

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    ids = AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]
    opts = {"model": tiny, "prompts": [ids[:1950], ids[500:2000]], "max_tokens": NEW_TOKENS,
            "llm": {"max_model_len": 2048, "max_num_batched_tokens": 1024}}
    one = scenarios.run("gen", four_units, "class", opts).ok()
    two = scenarios.run("gen", four_units, "class", {
        **opts, "llm": {**opts["llm"], "tensor_parallel_size": 2}}).ok()
    assert len(two["workers"]) == 2
    assert two["outputs"] == one["outputs"]
    assert all(len(o) == NEW_TOKENS for o in one["outputs"])
