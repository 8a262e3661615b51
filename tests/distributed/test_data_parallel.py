"""Data parallelism (Ray DP backend) across raylets on distinct loopback addresses.

DP=2 and DP=2 x TP=2 must give TP=1's greedy tokens, with both replicas serving requests
(which replica finished each request comes from vLLM's per-engine stats; where each
replica's workers run comes from ``node_info`` on every replica).
"""

from __future__ import annotations

import os

import pytest

from vllm_ray_metal.testing import scenarios
from vllm_ray_metal.testing.cluster import LocalRayCluster
NEW_TOKENS = 12


def run(c: LocalRayCluster, model: str, prompts: list[list[int]], **engine) -> dict:
    opts = {"model": model, "prompts": prompts, "max_tokens": NEW_TOKENS, "engine": engine}
    return scenarios.run("dp", c, opts=opts).result


def ok(res: dict) -> dict:
    assert "error" not in res, res.get("traceback", "")
    return res


@pytest.fixture(scope="module")
def dp1(tiny_tp1) -> dict:
    """The reference: the offline LLM's tokens at TP=1 (their first NEW_TOKENS) and its
    worker."""
    return {"outputs": [o[:NEW_TOKENS] for o in tiny_tp1["jobs"][0]],
            "worker": tiny_tp1["workers"][0]}


def assert_both_replicas_served(res: dict, n_prompts: int) -> None:
    served = res["served_by"]
    assert sorted(served) == sorted(f"req-{i}" for i in range(n_prompts))
    assert set(served.values()) == {0, 1}
    assert set(res["tokens_by_engine"]) == {"0", "1"}
    assert all(v > 0 for v in res["tokens_by_engine"].values())


# DP=2 with one rank a replica runs over HTTP (test_vllm_serve_dp2_spreads_requests) and
# with the mp backend (test_mp_backend_dp2_equals_dp1)


@pytest.mark.ray
def test_dp2_x_tp2_equals_dp1_on_four_nodes(four_units, tiny, prompts, dp1):
    res = ok(run(four_units, tiny, prompts, data_parallel_size=2, tensor_parallel_size=2))
    assert res["outputs"] == dp1["outputs"]
    assert all(len(o) == NEW_TOKENS for o in res["outputs"])
    assert_both_replicas_served(res, len(prompts))
    replicas = res["replicas"]
    assert replicas[0][0]["host_ip"] == four_units.head_ip  # replica 0 on the DP master
    assert [[w["rank"] for w in r] for r in replicas] == [[0, 1], [0, 1]]
    assert all(w["group_size"] == 2 for r in replicas for w in r)
    assert len({w["host_ip"] for r in replicas for w in r}) == 4  # every rank on its own node
    full = dp1["worker"]["layer_weight_bytes"]
    assert all(abs(w["layer_weight_bytes"] - full / 2) / (full / 2) < 0.02
               for r in replicas for w in r)


@pytest.mark.serve
def test_vllm_serve_dp2_spreads_requests(four_units, tiny, prompts, dp1, tmp_path):
    """`vllm serve --data-parallel-size 2 --data-parallel-backend ray`: TP=1's tokens over
    HTTP; vLLM's per-engine Prometheus counters show both replicas finished requests."""
    import re
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from vllm_ray_metal.testing.serve import ServeProcess, post

    log = tmp_path / "serve.log"
    with ServeProcess(four_units, tiny, log, "--max-model-len", "512",
                      "--kv-cache-memory-bytes", str(64 << 20), "--data-parallel-size", "2",
                      "--data-parallel-backend", "ray") as srv:
        srv.wait_healthy()

        def complete(ids: list[int]) -> list[int]:
            res = post(srv.base + "/v1/completions", {
                "model": "smollm2", "prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})
            return res["choices"][0]["token_ids"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            outputs = list(pool.map(complete, prompts))
        with urllib.request.urlopen(srv.base + "/metrics", timeout=30) as resp:
            metrics = resp.read().decode()
    assert not srv.alive_pids()
    assert outputs == dp1["outputs"]
    done = {e: float(n) for e, n in re.findall(
        r'vllm:request_success_total\{engine="(\d)",finished_reason="length"[^}]*\} (\S+)',
        metrics)}
    assert set(done) == {"0", "1"} and all(n >= 1 for n in done.values()), done
    assert sum(done.values()) == len(prompts)
    text = log.read_text()
    assert "RayMetalExecutor: 1 MLX worker(s) on" in text


@pytest.mark.ray
def test_more_replicas_than_units_fails_fast(four_units, tiny, prompts):
    res = run(four_units, tiny, prompts[:1], data_parallel_size=3, tensor_parallel_size=2)
    assert res["error"].startswith("PlacementError") and res["error_s"] < 20
    assert "data_parallel_size=3" in res["error"] and "needs 6" in res["error"]
    assert "127.0.0.15" in res["error"]  # the node table


@pytest.mark.ray
def test_mp_backend_dp2_equals_dp1(four_units, tiny, prompts, dp1):
    """``--data-parallel-backend mp``: engine cores are local processes; each replica's
    executor places its own workers on the cluster."""
    res = ok(run(four_units, tiny, prompts, data_parallel_size=2, data_parallel_backend="mp"))
    assert res["outputs"] == dp1["outputs"]
    assert_both_replicas_served(res, len(prompts))
    assert [len(r) for r in res["replicas"]] == [1, 1]
    assert len({w["pid"] for r in res["replicas"] for w in r}) == 2


def packing(units: list[int], dp: int, world: int, monkeypatch, local: int | None = None,
            keep_env: bool = False):
    """(strategy, replicas on the master) chosen for nodes with these METAL units."""
    from types import SimpleNamespace

    from vllm_ray_metal.distributed import cluster, data_parallel

    if not keep_env:  # (setenv first, so that teardown also removes what the code sets)
        for name in (data_parallel.PACK_ENV, data_parallel._OURS):
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)
    nodes = [cluster.NodeInfo(f"n{i}", f"10.0.0.{i + 1}", True, i == 0, {"METAL": u})
             for i, u in enumerate(units)]
    parallel = SimpleNamespace(data_parallel_size=dp, world_size=world,
                               data_parallel_master_ip="10.0.0.1",
                               data_parallel_size_local=dp if local is None else local)
    data_parallel._choose_packing(parallel, "METAL", nodes)
    return os.environ.get(data_parallel.PACK_ENV), parallel.data_parallel_size_local


@pytest.mark.unit
def test_packing_follows_the_nodes_units(monkeypatch):
    from vllm_ray_metal.distributed.cluster import PlacementError

    assert packing([1, 1], 2, 1, monkeypatch) == ("fill", 1)  # one replica per Mac
    assert packing([2], 2, 1, monkeypatch) == ("fill", 2)  # both on one Mac
    assert packing([4, 2], 3, 2, monkeypatch) == ("fill", 2)
    assert packing([1, 1, 1, 1], 2, 2, monkeypatch) == ("span", 1)  # DP x TP over Macs
    assert packing([1, 1], 2, 1, monkeypatch, local=1) == (None, 1)  # the user's choice
    # a second engine in the same process re-chooses; a user's strategy is kept
    assert packing([1, 1, 1, 1], 2, 1, monkeypatch) == ("fill", 1)
    assert packing([1, 1, 1, 1], 2, 2, monkeypatch, keep_env=True) == ("span", 1)
    monkeypatch.setenv("VLLM_RAY_DP_PACK_STRATEGY", "strict")
    assert packing([1, 1], 2, 1, monkeypatch, keep_env=True) == ("strict", 2)
    with pytest.raises(PlacementError, match="needs 6"):
        packing([1, 1, 1, 1], 3, 2, monkeypatch)
    with pytest.raises(PlacementError, match="advertises no 'METAL'"):
        packing([0, 2, 2], 2, 2, monkeypatch)
    with pytest.raises(PlacementError, match="only 1 replica"):
        packing([2, 1, 1], 2, 2, monkeypatch)
    with pytest.raises(PlacementError, match="identical nodes"):
        packing([1, 2, 2, 1], 2, 3, monkeypatch)
