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


OUR_MAC = {"METAL": 1.0, **MAC}  # `vllm-ray-metal start` on a Mac: Ray still adds GPU


@pytest.mark.parametrize("nodes, want", [
    ([node("a", {"METAL": 1}), node("b", {"METAL": 1})], "METAL"),
    ([node("a", OUR_MAC), node("b", OUR_MAC)], "METAL"),  # ties go METAL, mlx, GPU
    ([node("a", {"mlx": 2}), node("b", MAC)], "mlx"),
    ([node("a", MAC), node("b", MAC)], "GPU"),
    ([node("a", OUR_MAC), node("b", MAC)], "GPU"),  # both ways of starting: every Mac serves
    ([node("a", {"METAL": 1}, alive=False), node("b", MAC)], "GPU"),  # only alive nodes count
    ([node("a", {})], "METAL"),  # nothing usable: the default, whose error names all three
])
def test_auto_takes_the_key_with_the_most_units(monkeypatch, nodes, want):
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
    assert "10.0.0.2 (A100)" in msg and "10.0.0.1" in msg and "vllm-ray-metal start" in msg
    # unlabelled GPU nodes (this rig's --num-gpus, a Mac whose chip Ray did not read) pass
    keys.check([node("127.0.0.2", {"GPU": 1.0}), node("127.0.0.3", MAC)],
               keys.KeyChoice("GPU", "auto"))


def test_nodes_the_chosen_key_leaves_out_are_named(monkeypatch):
    said = []
    monkeypatch.setattr(keys.logger, "warning", lambda msg, *args: said.append(msg % args))
    nodes = [node("10.0.0.1", {"METAL": 2}), node("10.0.0.2", {"mlx": 1})]
    keys.check(nodes, keys.choose(nodes))
    assert len(said) == 1 and "10.0.0.2 advertises only mlx" in said[0], said
    assert "VLLM_RAY_METAL_RAY_KEY" in said[0]


def test_no_usable_key_names_all_three_and_the_fix(monkeypatch):
    monkeypatch.delenv("VLLM_RAY_METAL_RAY_KEY", raising=False)
    with pytest.raises(PlacementError) as info:
        cluster.check_capacity("METAL", 1, [node("127.0.0.4", {})])
    msg = str(info.value)
    assert all(k in msg for k in ("'METAL'", "mlx", "GPU")) and "127.0.0.4" in msg
    assert "ray start --address" in msg and "vllm-ray-metal start" in msg
    monkeypatch.setenv("VLLM_RAY_METAL_RAY_KEY", "mlx")  # named: only that one is looked for
    with pytest.raises(PlacementError) as info:
        cluster.check_capacity("mlx", 1, [node("127.0.0.4", {"GPU": 1})])
    assert "nor" not in str(info.value)
    with pytest.raises(PlacementError, match="Ray advertises each Mac's GPU"):
        cluster.check_capacity("GPU", 2, [node("127.0.0.4", MAC)])


def test_with_gpu_the_workers_device_ids_are_rays():
    nodes = [node("n1", {"GPU": 8.0})]
    placements = [Placement("n1", "10.0.0.1", 1, 1, False, [5]),
                  Placement("n1", "10.0.0.1", 1, 2, False, [3])]
    plans = plan_workers(placements, nodes, "GPU", ring_ports=[5, 6])
    assert [p.device_ids for p in plans] == [[3, 5], [3, 5]]  # not renumbered 0..n-1
    assert [p.local_rank for p in plans] == [0, 1]


def test_adopting_the_key_is_what_vllm_reads():
    from vllm.platforms import current_platform

    before = current_platform.ray_device_key
    try:
        keys.adopt("GPU")
        assert current_platform.ray_device_key == "GPU"
    finally:
        keys.adopt(before)
