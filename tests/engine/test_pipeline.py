"""Pipeline parallelism (and TP x PP) across raylets on distinct loopback addresses."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vllm_ray_metal.testing import scenarios
from vllm_ray_metal.testing.cluster import LocalRayCluster
from vllm_ray_metal.testing.llm import config_error
from vllm_ray_metal.testing.structured import json_rows_start_with_a_brace

NEW_TOKENS = 32  # (tiny_jobs' max_tokens)
# Small steps: prompts are split into chunks that are in flight in different batches of
# vLLM's PP batch queue at the same time (the scheduling PP must survive).
STEP_TOKENS = 48


@pytest.fixture(scope="module")
def tiny(tiny_5_layers):
    return tiny_5_layers  # 5 layers: vLLM splits them unevenly ([3, 2] over two stages)


def generate(c: LocalRayCluster, model: str, jobs: list[dict], **llm) -> dict:
    """The plain and the constrained job of ``tiny_jobs`` (``res["outputs"]``,
    ``res["constrained"]``)."""
    llm.setdefault("max_num_batched_tokens", STEP_TOKENS)
    started = time.perf_counter()
    res = scenarios.run("gen", c, "class", {"model": model, "jobs": jobs[:2], "llm": llm}).ok()
    res["outputs"], res["constrained"] = res.pop("jobs")
    assert all(len(o) == NEW_TOKENS for o in res["outputs"])
    print(f"{Path(model).name} {llm}: ready {res['ready_s']:.1f} s, whole driver "
          f"{time.perf_counter() - started:.1f} s")
    return res


@pytest.fixture(scope="module")
def tiny_pp1(four_units, tiny, tiny_jobs):
    return generate(four_units, tiny, tiny_jobs)


@pytest.mark.ray
def test_pp2_equals_pp1_plain_and_constrained(four_units, tiny, tiny_jobs, tiny_pp1):
    """PP=2 gives PP=1's tokens, also under JSON schemas (the last stage applies the
    grammar bitmask)."""
    res = generate(four_units, tiny, tiny_jobs, pipeline_parallel_size=2)
    assert res["outputs"] == tiny_pp1["outputs"]
    assert res["constrained"] == tiny_pp1["constrained"]
    assert json_rows_start_with_a_brace(tiny, res["constrained"], tiny_jobs[1]["json_schemas"])
    workers = res["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert [w["layers"] for w in workers] == [[0, 3], [3, 5]]
    assert len({w["host_ip"] for w in workers}) == 2  # one stage per raylet address
    # vLLM's split of 5 layers is [3, 2]; each stage holds only its own layers
    full = tiny_pp1["workers"][0]
    per_layer = full["layer_weight_bytes"] / 5
    assert [w["layer_weight_bytes"] for w in workers] == pytest.approx(
        [3 * per_layer, 2 * per_layer], rel=1e-6)
    # tied embeddings: on the first stage (input) and the last (output); the final norm
    # only on the last stage
    embed = full["weight_bytes"] - full["layer_weight_bytes"]
    assert sum(w["weight_bytes"] for w in workers) == pytest.approx(
        full["weight_bytes"] + embed, rel=1e-3)


@pytest.mark.ray
def test_tp2_pp2_equals_tp1(four_units, tiny, tiny_jobs, tiny_pp1):
    res = generate(four_units, tiny, tiny_jobs, tensor_parallel_size=2, pipeline_parallel_size=2)
    assert res["outputs"] == tiny_pp1["outputs"]
    assert res["constrained"] == tiny_pp1["constrained"]
    workers = res["workers"]
    assert [w["rank"] for w in workers] == [0, 1, 2, 3]
    assert [w["layers"] for w in workers] == [[0, 3], [0, 3], [3, 5], [3, 5]]
    assert len({w["host_ip"] for w in workers}) == 4
    per_layer = tiny_pp1["workers"][0]["layer_weight_bytes"] / 5
    assert [w["layer_weight_bytes"] for w in workers] == pytest.approx(
        [1.5 * per_layer] * 2 + [1.0 * per_layer] * 2, rel=0.02)  # 3 and 2 layers, halved


@pytest.mark.unit
def test_more_stages_than_layers_is_rejected(tiny):
    msg = config_error(tiny, max_model_len=256, pipeline_parallel_size=6,
                       distributed_executor_backend="ray")
    assert "pipeline_parallel_size <= 5" in msg


@pytest.mark.unit
def test_stage_layer_ranges_are_vllms():
    from vllm.distributed.utils import get_pp_indices

    from vllm_ray_metal.engine import pipeline

    for layers, pp in [(5, 2), (30, 4), (7, 3), (4, 4)]:
        assert pipeline.layer_ranges(layers, pp) == tuple(
            get_pp_indices(layers, r, pp) for r in range(pp))
