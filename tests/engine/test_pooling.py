"""Embeddings from the pooling runner (``runner="pooling"``) against transformers on the
same weights, pooled the same way (the final normed hidden states, then L2 norm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_ray_metal.testing.llm import config_error, make_llm, shutdown_llm

TEXTS = ["The capital of France is Paris.", "Mountains rise above the valley.", "hello",
         "Cats and dogs share the house; the cat sleeps all day and the dog barks. " * 6]


def hf_hidden(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model.model(torch.tensor([ids])).last_hidden_state[0]  # [T, H], normed


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def embedder(model_dir):
    engine = make_llm(model_dir, runner="pooling", max_num_batched_tokens=48)  # chunks TEXTS[3]
    yield engine
    shutdown_llm(engine)


def token_ids(llm, text: str) -> list[int]:
    return llm.get_tokenizer()(text)["input_ids"]


@pytest.mark.engine
@pytest.mark.core
def test_last_token_embeddings_equal_transformers(embedder, hf_reference):
    assert len(token_ids(embedder, TEXTS[3])) > 48  # the long text arrives in chunks
    outs = embedder.embed(TEXTS, use_tqdm=False)
    for text, out in zip(TEXTS, outs):
        ours = np.asarray(out.outputs.embedding)
        ref = torch.nn.functional.normalize(hf_hidden(hf_reference, token_ids(embedder, text))[-1],
                                            dim=-1).numpy()
        assert ours.shape == ref.shape
        assert abs(np.linalg.norm(ours) - 1) < 1e-4
        assert cosine(ours, ref) >= 0.999, text


@pytest.mark.engine
def test_a_batch_equals_each_input_alone(embedder):
    batch = [np.asarray(o.outputs.embedding) for o in embedder.embed(TEXTS, use_tqdm=False)]
    for text, together in zip(TEXTS, batch):
        alone = np.asarray(embedder.embed([text], use_tqdm=False)[0].outputs.embedding)
        np.testing.assert_allclose(together, alone, atol=2e-5)


@pytest.mark.engine
def test_score_is_the_cosine_of_the_embeddings(embedder):
    query, docs = "What is the capital of France?", ["Paris is the capital.", "Bananas."]
    scores = [s.outputs.score for s in embedder.score(query, docs, use_tqdm=False)]
    emb = [np.asarray(o.outputs.embedding)
           for o in embedder.embed([query, *docs], use_tqdm=False)]
    expected = [cosine(emb[0], e) for e in emb[1:]]
    np.testing.assert_allclose(scores, expected, atol=1e-4)


@pytest.mark.engine
def test_mean_pooling_equals_transformers(model_dir, hf_reference):
    engine = make_llm(model_dir, runner="pooling",  # (vLLM does not chunk MEAN prompts)
                      pooler_config={"pooling_type": "MEAN"})
    try:
        outs = engine.embed(TEXTS, use_tqdm=False)
        for text, out in zip(TEXTS, outs):
            hidden = hf_hidden(hf_reference, token_ids(engine, text))
            ref = torch.nn.functional.normalize(hidden.mean(0), dim=-1).numpy()
            assert cosine(out.outputs.embedding, ref) >= 0.999, text
    finally:
        shutdown_llm(engine)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["LAST", "MEAN", "CLS"])
def test_chunks_pool_like_the_whole_prompt(kind):
    """Chunked, and started over from position 0 (a preempted request's recompute)."""
    import mlx.core as mx

    from vllm_ray_metal.engine.pooling import Pooled

    hidden = np.random.default_rng(1).standard_normal((10, 6)).astype(np.float32)
    pooled = Pooled(kind, normalize=True, dimensions=4)
    pooled.add(mx.array(hidden[:5] + 1), 0)  # the first attempt, then preempted
    for start, end in [(0, 3), (3, 4), (4, 10)]:
        pooled.add(mx.array(hidden[start:end]), start)
    whole = {"LAST": hidden[-1], "MEAN": hidden.mean(0), "CLS": hidden[0]}[kind][:4]
    whole = whole / np.linalg.norm(whole)
    np.testing.assert_allclose(np.asarray(pooled.finish(10)), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("kw, needle", [
    ({"runner": "pooling", "convert": "classify"}, "--convert embed"),
    ({"runner": "pooling", "pooler_config": {"pooling_type": "STEP"}}, "LAST"),
    ({"runner": "pooling", "pipeline_parallel_size": 2}, "--tensor-parallel-size"),
    ({"runner": "pooling", "pooler_config": {"task": "token_embed"}}, "'embed'"),
    ({"runner": "pooling", "pooler_config": {"pooling_type": "MEAN"},
      "enable_prefix_caching": True}, "drop --enable-prefix-caching"),
])
def test_unsupported_pooling_configs_name_what_works(model_dir, kw, needle):
    assert needle in config_error(model_dir, max_model_len=512, **kw)
