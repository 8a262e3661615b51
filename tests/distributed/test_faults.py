"""Worker death mid-generation: a clear error fast, no orphan, the cluster still serves."""

from __future__ import annotations

import pytest

from vllm_ray_metal.testing import scenarios
from vllm_ray_metal.testing.cluster import LocalRayCluster


# engine core in the caller's process (our default) at TP=1, spawned (upstream's) at TP=2;
# the same cluster serves a fresh LLM afterwards (checked once: the error path differs, the
# recovery does not)
@pytest.mark.ray
@pytest.mark.parametrize("tp,engine_mp", [(1, None), (2, "1")])
def test_killed_worker_gives_clear_error_and_cluster_recovers(tp, engine_mp, model_dir, tiny):
    model = tiny if tp > 1 else model_dir
    opts = {"model": model, "llm": {"tensor_parallel_size": tp}, "no_recovery": tp > 1}
    nodes = [("127.0.0.42", {})] + [(f"127.0.0.{43 + i}", {"METAL": 1}) for i in range(tp)]
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": engine_mp} if engine_mp else {}
    with LocalRayCluster(nodes) as c:
        res = scenarios.run("kill", c, "class", opts, env=env,
                            clean=("RAY_ADDRESS", "VLLM_ENABLE_V1_MULTIPROCESSING")).ok()
    assert res["fault"].startswith("EngineDeadError"), res["fault"]
    assert res["engine_core"] == ("SyncMPClient" if engine_mp else "InprocClient")
    if not engine_mp:  # our message names the worker that died
        assert "MLX worker rank" in res["fault"] and "died" in res["fault"], res["fault"]
    assert res["time_to_error_s"] < 30
    assert res["victim_gone"]
    if tp == 1:
        assert res["text"] and len(res["workers"]) == tp
