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
def five(tiny_5_layers):
    return tiny_5_layers  # 5 layers: vLLM splits them unevenly ([3, 2] over two stages)


@pytest.fixture(scope="module")
def jobs(five, tiny_jobs, tmp_path_factory) -> list[dict]:
    """The plain and the constrained job of ``tiny_jobs``, and the chat prompts on a PEFT
    LoRA adapter of this model and on the base model in one batch."""
    from vllm_ray_metal.testing import lora

    path = lora.peft_adapter(tmp_path_factory.mktemp("pp-lora") / "peft", five, size=0.3)
    prompts = tiny_jobs[0]["prompts"]
    return [*tiny_jobs[:2], {"prompts": prompts * 2, "max_tokens": NEW_TOKENS,
                             "loras": [["peft", 1, path]] * len(prompts)
                             + [None] * len(prompts)}]


def generate(c: LocalRayCluster, model: str, jobs: list[dict], **llm) -> dict:
    """``jobs``' tokens (``res["outputs"]``, ``res["constrained"]``, ``res["adapted"]``)."""
    llm.setdefault("max_num_batched_tokens", STEP_TOKENS)
    llm.update(enable_lora=True, max_loras=1, max_lora_rank=8)
    started = time.perf_counter()
    res = scenarios.run("gen", c, "class", {"model": model, "jobs": jobs, "llm": llm}).ok()
    res["outputs"], res["constrained"], res["adapted"] = res.pop("jobs")
    assert all(len(o) == NEW_TOKENS for o in res["outputs"])
    print(f"{Path(model).name} {llm}: ready {res['ready_s']:.1f} s, whole driver "
          f"{time.perf_counter() - started:.1f} s")
    return res


@pytest.fixture(scope="module")
def tiny_pp1(four_units, five, jobs):
    res = generate(four_units, five, jobs)
    n = len(res["outputs"])
    assert res["adapted"][n:] == res["outputs"]  # base rows beside adapter rows
    assert sum(a != b for a, b in zip(res["adapted"], res["outputs"])) >= 2
    return res


@pytest.mark.ray
def test_pp2_equals_pp1_plain_constrained_and_on_an_adapter(four_units, five, tiny_jobs,
                                                            jobs, tiny_pp1):
    """PP=2 gives PP=1's tokens, also under JSON schemas (the last stage applies the
    grammar bitmask) and on a LoRA adapter (each stage holds its layers' share)."""
    res = generate(four_units, five, jobs, pipeline_parallel_size=2)
    assert res["outputs"] == tiny_pp1["outputs"]
    assert res["constrained"] == tiny_pp1["constrained"]
    assert res["adapted"] == tiny_pp1["adapted"]
    assert json_rows_start_with_a_brace(five, res["constrained"], tiny_jobs[1]["json_schemas"])
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
    embed = full["weight_bytes"] - full["layer_weight_bytes"] - full["lora_bytes"]
    assert sum(w["weight_bytes"] for w in workers) == pytest.approx(
        full["weight_bytes"] + embed, rel=1e-3)


@pytest.mark.ray
def test_tp2_pp2_equals_tp1(four_units, five, jobs, tiny_pp1):
    res = generate(four_units, five, jobs, tensor_parallel_size=2, pipeline_parallel_size=2)
    assert res["outputs"] == tiny_pp1["outputs"]
    assert res["constrained"] == tiny_pp1["constrained"]
    assert res["adapted"] == tiny_pp1["adapted"]
    workers = res["workers"]
    assert [w["rank"] for w in workers] == [0, 1, 2, 3]
    assert [w["layers"] for w in workers] == [[0, 3], [0, 3], [3, 5], [3, 5]]
    assert len({w["host_ip"] for w in workers}) == 4
    per_layer = tiny_pp1["workers"][0]["layer_weight_bytes"] / 5
    assert [w["layer_weight_bytes"] for w in workers] == pytest.approx(
        [1.5 * per_layer] * 2 + [1.0 * per_layer] * 2, rel=0.02)  # 3 and 2 layers, halved


@pytest.mark.unit
def test_more_stages_than_layers_is_rejected(five):
    msg = config_error(five, max_model_len=256, pipeline_parallel_size=6,
                       distributed_executor_backend="ray")
    assert "pipeline_parallel_size <= 5" in msg


@pytest.mark.unit
def test_stage_layer_ranges_are_vllms():
    from vllm.distributed.utils import get_pp_indices

    from vllm_ray_metal.engine import pipeline

    for layers, pp in [(5, 2), (30, 4), (7, 3), (4, 4)]:
        assert pipeline.layer_ranges(layers, pp) == tuple(
            get_pp_indices(layers, r, pp) for r in range(pp))
