"""Each Ray touch-point of compat/ray.py against the installed Ray. Joining a driver at a
node (``init``) and ``node_ip`` run in every scenario of tests/distributed; the preload
config and the PrestartWorkers RPC end to end in tests/cli/test_cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_ray_metal.compat import ray as compat_ray

pytestmark = pytest.mark.unit


def test_pinned_ray_version():
    import ray

    assert ray.__version__.startswith(compat_ray.RAY_VERSION)


def test_head_resource_and_address_file_are_rays():
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME
    from ray._common.utils import get_ray_address_file

    assert compat_ray.HEAD_NODE_RESOURCE == HEAD_NODE_RESOURCE_NAME
    assert compat_ray.is_head({HEAD_NODE_RESOURCE_NAME: 1.0, "CPU": 2.0})
    assert not compat_ray.is_head({"CPU": 2.0})
    assert Path(get_ray_address_file(None)) == compat_ray.RAY_ADDRESS_FILE


def test_forget_cluster_address_removes_only_our_head(tmp_path, monkeypatch):
    recorded = tmp_path / "ray_current_cluster"
    monkeypatch.setattr(compat_ray, "RAY_ADDRESS_FILE", recorded)
    recorded.write_text("10.0.0.1:6379")
    compat_ray.forget_cluster_address("10.0.0.2:6379")
    assert recorded.exists()
    compat_ray.forget_cluster_address("10.0.0.1:6379")
    assert not recorded.exists()
    compat_ray.forget_cluster_address("10.0.0.1:6379")  # gone already: no error


def test_prestart_request_is_built_and_sent_over_rays_channel():
    """The RPC's message and stub, over Ray's channel helper, to a port nobody serves: the
    call must fail as an RPC error (what the executor catches), not as a missing symbol."""
    import grpc
    from ray.core.generated import node_manager_pb2

    fields = node_manager_pb2.PrestartWorkersRequest.DESCRIPTOR.fields_by_name
    assert {"language", "num_workers"} <= set(fields)
    from vllm_ray_metal.testing.cluster import free_port

    with pytest.raises(grpc.RpcError):
        compat_ray.prestart_workers("127.0.0.1", free_port(), 1, timeout=0.5)


def test_osx_cluster_env_is_set_once_and_kept(monkeypatch):
    env: dict[str, str] = {}
    compat_ray.set_osx_cluster_env(env)
    assert env == {} or compat_ray.MACOS  # only on macOS
    monkeypatch.setattr(compat_ray, "MACOS", True)
    compat_ray.set_osx_cluster_env(env)
    assert env == {compat_ray.OSX_CLUSTER_ENV: "1"}
    env[compat_ray.OSX_CLUSTER_ENV] = "0"  # the user's value wins
    compat_ray.set_osx_cluster_env(env)
    assert env[compat_ray.OSX_CLUSTER_ENV] == "0"
