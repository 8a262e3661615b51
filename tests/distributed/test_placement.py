"""From Ray's placements to each worker's local rank, device ids and spec (no Ray)."""

from __future__ import annotations

import json

import pytest

from vllm_ray_metal.distributed.cluster import NodeInfo, PlacementError
from vllm_ray_metal.distributed.placement import (Placement, plan_workers,
                                                  preloaded_workers_used)
from vllm_ray_metal.engine.spec import ENV

pytestmark = pytest.mark.unit


def node(node_id: str, address: str, units: float, host: str = "", port: int = 0) -> NodeInfo:
    return NodeInfo(node_id, address, True, False, {"METAL": units}, hostname=host,
                    manager_port=port)


def spec(plan) -> dict:
    return json.loads(plan.env[ENV])


def test_one_worker_per_mac():
    nodes = [node("a", "10.0.0.1", 1, "mac1"), node("b", "10.0.0.2", 1, "mac2")]
    placements = [Placement("a", "10.0.0.1", 1, 11, False), Placement("b", "10.0.0.2", 1, 12,
                                                                      False)]
    plans = plan_workers(placements, nodes, "METAL", ring_ports=[5000, 5001])
    assert [p.local_rank for p in plans] == [0, 0] and [p.device_ids for p in plans] == [[0], [0]]
    assert [p.env["VLLM_HOST_IP"] for p in plans] == ["10.0.0.1", "10.0.0.2"]
    assert spec(plans[1]) == {"mlx_hosts": ["10.0.0.1:5000", "10.0.0.2:5001"],
                              "ranks_on_node": 1, "ranks_on_host": 1}


def test_ranks_sharing_a_node_and_a_machine():
    # two raylets of one machine (loopback), one with 2 units of which this executor uses 2,
    # the other with 2 units another replica may use: the machine's cores serve 4 ranks
    nodes = [node("a", "127.0.0.2", 2, "box"), node("b", "127.0.0.3", 2, "box"),
             node("c", "10.0.0.9", 0, "other")]
    placements = [Placement("a", "127.0.0.2", 1, 1, False), Placement("a", "127.0.0.2", 1, 2,
                                                                      False)]
    plans = plan_workers(placements, nodes, "METAL", ring_ports=[7, 8])
    assert [p.local_rank for p in plans] == [0, 1]
    assert [p.device_ids for p in plans] == [[0, 1], [0, 1]]
    assert [spec(p)["ranks_on_node"] for p in plans] == [2, 2]
    assert [spec(p)["ranks_on_host"] for p in plans] == [4, 4]


def test_more_workers_than_the_node_advertises_still_count_as_ours():
    nodes = [node("a", "10.0.0.1", 1)]
    placements = [Placement("a", "10.0.0.1", 1, 1, False)] * 3
    plans = plan_workers(placements, nodes, "METAL", ring_ports=[1, 2, 3])
    assert {spec(p)["ranks_on_node"] for p in plans} == {3}


def test_a_single_worker_has_no_ring_and_a_unitless_one_is_refused():
    nodes = [node("a", "10.0.0.1", 1)]
    (plan,) = plan_workers([Placement("a", "10.0.0.1", 1, 1, False)], nodes, "METAL")
    assert spec(plan)["mlx_hosts"] == []
    with pytest.raises(PlacementError, match="without any 'METAL' unit"):
        plan_workers([Placement("a", "10.0.0.1", 0, 1, False)], nodes, "METAL")


def test_preloaded_workers_are_counted_by_raylet():
    nodes = [node("a", "10.0.0.1", 2, port=6380), node("b", "10.0.0.2", 1, port=0)]
    placements = [Placement("a", "10.0.0.1", 1, 1, True), Placement("a", "10.0.0.1", 1, 2, True),
                  Placement("b", "10.0.0.2", 1, 3, True)]
    assert preloaded_workers_used(placements, nodes) == {("10.0.0.1", 6380): 2}
