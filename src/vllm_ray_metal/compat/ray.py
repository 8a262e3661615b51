"""Every touch-point with Ray beyond its public API (Ray 2.60), in one place.

Each helper names what it relies on; ``tests/compat/test_compat_ray.py`` exercises each against
the installed Ray, so a change fails there instead of inside a worker.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

RAY_VERSION = "2.60"

# ray._common.constants.HEAD_NODE_RESOURCE_NAME: the resource only the head node has
HEAD_NODE_RESOURCE = "node:__internal_head__"

# Ray's raylet config preload_python_modules, as `ray start` reads it from the
# environment: the node's idle Python workers import these modules while idle
PRELOAD_ENV = "RAY_preload_python_modules"

# Ray refuses multi-node clusters on macOS unless this is set on every node
OSX_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
MACOS = sys.platform == "darwin"  # (tests stand in a Mac by setting it True)

# ray._common.utils.get_ray_address_file(None): where `ray start --head` records the
# newest cluster's address; a plain `ray.init()` then tries to join it (documented in
# ray.init). `ray stop` removes it; so does `vllm-ray-metal stop`, for its own head.
RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")


def is_head(resources: dict[str, float]) -> bool:
    """Whether a ``ray.nodes()`` entry's resources are the head node's."""
    return HEAD_NODE_RESOURCE in resources


def node_ip() -> str:
    """The Ray address of this process's node (``ray.util.get_node_ip_address``)."""
    import ray

    return ray.util.get_node_ip_address()


def init(address: str | None = None, node_ip: str | None = None, **kwargs: Any) -> None:
    """``ray.init``, as a driver on the node whose Ray address is ``node_ip``.

    ``ray.init(_node_ip_address=...)`` is the only way to say which local node a driver
    belongs to when the machine runs several raylets or its default route is not the
    node's address.
    """
    import ray

    if node_ip:
        kwargs["_node_ip_address"] = node_ip
    ray.init(address=address, **kwargs)


def forget_cluster_address(address: str) -> None:
    """Remove Ray's current-cluster file if it points at ``address``."""
    try:
        if RAY_ADDRESS_FILE.read_text().strip() == address:
            RAY_ADDRESS_FILE.unlink()
    except OSError:
        pass


def prestart_workers(address: str, port: int, count: int, timeout: float = 2.0) -> None:
    """Ask the raylet at ``address:port`` to start ``count`` idle Python workers now.

    The raylet's ``NodeManagerService.PrestartWorkers`` RPC, over the channel helper
    Ray's own state API uses (it adds token auth and TLS when enabled). The raylet
    answers once the starts are queued.
    """
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

    channel = init_grpc_channel(f"{address}:{port}")
    try:
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(
            node_manager_pb2.PrestartWorkersRequest(
                language=common_pb2.Language.PYTHON, num_workers=count), timeout=timeout)
    finally:
        channel.close()


def attach_once(address: str, node_ip: str) -> None:
    """Connect a throw-away driver at ``node_ip`` and leave: Ray then pre-starts the
    node's idle workers (it does so when a first driver attaches)."""
    import ray

    init(address, node_ip, logging_level="ERROR")
    ray.shutdown()


def set_osx_cluster_env(env: dict[str, str] | None = None) -> None:
    """On macOS, allow multi-node Ray (in ``env``, or this process's environment); a value
    already there is kept."""
    if MACOS:
        (os.environ if env is None else env).setdefault(OSX_CLUSTER_ENV, "1")


if __name__ == "__main__":  # `python -m vllm_ray_metal.compat.ray ADDRESS NODE_IP`
    import sys

    attach_once(sys.argv[1], sys.argv[2])
