"""Worker death mid-generation: a clear error fast, no orphan, the cluster still serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_cluster import LocalRayCluster
from conftest import tiny_llama

SCENARIOS = Path(__file__).with_name("ray_scenarios.py")


# engine core in the caller's process (our default) at TP=1, spawned (upstream's) at TP=2
@pytest.mark.parametrize("tp,engine_mp", [(1, None), (2, "1")])
def test_killed_worker_gives_clear_error_and_cluster_recovers(tp, engine_mp, model_dir,
                                                              tmp_path):
    model = tiny_llama(tmp_path / "tiny", model_dir) if tp > 1 else model_dir
    opts = {"model": model, "llm": {"tensor_parallel_size": tp}}
    nodes = [("127.0.0.42", {})] + [(f"127.0.0.{43 + i}", {"METAL": 1}) for i in range(tp)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    if engine_mp:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = engine_mp
    with LocalRayCluster(nodes) as c:
        out = subprocess.run([sys.executable, str(SCENARIOS), "kill", c.address, c.head_ip,
                              "class", json.dumps(opts)], capture_output=True, text=True,
                             timeout=600, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in res, res.get("traceback", "") + out.stderr[-3000:]
    assert res["fault"].startswith("EngineDeadError"), res["fault"]
    assert res["engine_core"] == ("SyncMPClient" if engine_mp else "InprocClient")
    if not engine_mp:  # our message names the worker that died
        assert "MLX worker rank" in res["fault"] and "died" in res["fault"], res["fault"]
    assert res["time_to_error_s"] < 30
    assert res["victim_gone"]
    assert res["text"] and len(res["workers"]) == tp
