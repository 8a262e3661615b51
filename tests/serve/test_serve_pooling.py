"""`vllm serve --runner pooling`: /v1/embeddings and /v1/score through RayMetalExecutor,
against transformers on the same weights; unsupported pooling requests answer 400."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from vllm_ray_metal.testing.serve import post, refusals_that_fail, served

pytestmark = pytest.mark.serve
TEXTS = ["The capital of France is Paris.", "Mountains rise above the valley.", "hello",
         "Cats and dogs share the house; the cat sleeps all day and the dog barks."]


@pytest.fixture(scope="module")
def pooler(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("pooling") / "serve.log"
    with served(model_dir, log, "127.0.0.60", "127.0.0.61", 32, "--runner", "pooling") as srv:
        yield srv


def embed(pooler, inputs) -> np.ndarray:
    res = post(pooler.base + "/v1/embeddings", {"model": "smollm2", "input": inputs})
    return np.array([d["embedding"] for d in sorted(res["data"], key=lambda d: d["index"])])


def test_embeddings_equal_transformers_and_batch_equals_alone(pooler, hf_reference, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = embed(pooler, TEXTS)
    for text, ours in zip(TEXTS, batch):
        with torch.no_grad():
            hidden = hf_reference.model(torch.tensor([tok(text)["input_ids"]])).last_hidden_state
        ref = torch.nn.functional.normalize(hidden[0, -1], dim=-1).numpy()
        assert ours @ ref / np.linalg.norm(ours) >= 0.999, text
        np.testing.assert_allclose(embed(pooler, text)[0], ours, atol=2e-5)


def test_score_is_the_cosine_of_the_embeddings(pooler):
    res = post(pooler.base + "/v1/score", {"model": "smollm2", "text_1": TEXTS[0],
                                           "text_2": TEXTS[1:3]})
    scores = [d["score"] for d in sorted(res["data"], key=lambda d: d["index"])]
    emb = embed(pooler, TEXTS[:3])
    expected = [float(emb[0] @ e / np.linalg.norm(emb[0]) / np.linalg.norm(e)) for e in emb[1:]]
    np.testing.assert_allclose(scores, expected, atol=1e-4)


BAD = [
    ("v1/embeddings", {"model": "smollm2", "input": "hi", "dimensions": 8}, 400, ["dimensions"]),
    ("v1/embeddings", {"model": "smollm2", "input": "hi " * 600}, 400, ["512"]),
    ("pooling", {"model": "smollm2", "input": "hi", "task": "classify"}, 400, ["classify"]),
]


def test_unsupported_pooling_requests_answer_400_fast(pooler):
    def still_serving():
        assert len(embed(pooler, "still serving")[0]) == 576

    wrong = refusals_that_fail(pooler.base, BAD, still_serving)
    assert not wrong, "\n".join(map(str, wrong))
