"""Which Ray resource the executor uses: METAL, then mlx, then Ray's own GPU (auto)."""

from __future__ import annotations

import pytest

from vllm_ray_metal.distributed import cluster, keys
from vllm_ray_metal.distributed.cluster import NodeInfo, PlacementError
from vllm_ray_metal.distributed.placement import Placement, plan_workers

pytestmark = pytest.mark.unit


def node(address: str, resources: dict, alive: bool = True) -> NodeInfo:
    return NodeInfo(address, address, alive, False, {"CPU": 8.0, **resources})


MAC = {"GPU": 1.0, "accelerator_type:M2-Max": 1.0}  # plain `ray start` on an M2 Max


@pytest.mark.parametrize("nodes, want", [
    ([node("a", {"METAL": 1}), node("b", MAC)], "METAL"),
    ([node("a", {"mlx": 2}), node("b", MAC)], "mlx"),
    ([node("a", MAC), node("b", MAC)], "GPU"),
    ([node("a", {"METAL": 1}, alive=False), node("b", MAC)], "GPU"),  # only alive nodes count
    ([node("a", {})], "METAL"),  # nothing usable: the default, whose error names all three
])
def test_auto_takes_the_first_key_any_alive_node_advertises(monkeypatch, nodes, want):
    monkeypatch.delenv("VLLM_RAY_METAL_RAY_KEY", raising=False)
    choice = keys.choose(nodes)
    assert choice.key == want and choice.reason


def test_an_explicit_key_wins(monkeypatch):
    monkeypatch.setenv("VLLM_RAY_METAL_RAY_KEY", "mlx")
    choice = keys.choose([node("a", {"METAL": 1})])
    assert choice == keys.KeyChoice("mlx", "VLLM_RAY_METAL_RAY_KEY=mlx")
    monkeypatch.setenv("VLLM_RAY_METAL_RAY_KEY", "auto")
    assert keys.explicit() is None


def test_gpu_nodes_that_are_not_macs_beside_macs_are_refused():
    nodes = [node("10.0.0.1", MAC), node("10.0.0.2", {"GPU": 1.0, "accelerator_type:A100": 1})]
    with pytest.raises(PlacementError) as info:
        keys.check(nodes, keys.KeyChoice("GPU", "auto"))
    msg = str(info.value)
    assert "10.0.0.2" in msg and "10.0.0.1" in msg and "vllm-ray-metal start" in msg
    keys.check([node("127.0.0.2", {"GPU": 1.0})] * 2, keys.KeyChoice("GPU", "auto"))  # rig


def test_nodes_the_chosen_key_leaves_out_are_named(caplog):
    nodes = [node("10.0.0.1", {"METAL": 1}), node("10.0.0.2", MAC)]
    with caplog.at_level("WARNING"):
        keys.check(nodes, keys.choose(nodes))
    assert "10.0.0.2" in caplog.text and "VLLM_RAY_METAL_RAY_KEY" in caplog.text


def test_no_usable_key_names_all_three_and_the_fix():
    with pytest.raises(PlacementError) as info:
        cluster.check_capacity("METAL", 1, [node("127.0.0.4", {})])
    msg = str(info.value)
    assert all(k in msg for k in ("METAL", "mlx", "GPU")) and "127.0.0.4" in msg
    assert "ray start --address" in msg and "vllm-ray-metal start" in msg


def test_with_gpu_the_workers_device_ids_are_rays():
    nodes = [node("n1", {"GPU": 2.0})]
    placements = [Placement("n1", "10.0.0.1", 1, 1, False, [1]),
                  Placement("n1", "10.0.0.1", 1, 2, False, [0])]
    plans = plan_workers(placements, nodes, "GPU", ring_ports=[5, 6])
    assert [p.device_ids for p in plans] == [[0, 1], [0, 1]]
    assert [p.local_rank for p in plans] == [0, 1]


def test_adopting_the_key_is_what_vllm_reads():
    from vllm.platforms import current_platform

    before = current_platform.ray_device_key
    try:
        keys.adopt("GPU")
        assert current_platform.ray_device_key == "GPU"
    finally:
        keys.adopt(before)
