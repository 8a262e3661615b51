"""Which Ray resource marks a node's MLX worker slots, chosen from the cluster itself.

Three kinds of clusters reach us: nodes started with ``vllm-ray-metal start`` advertise
``METAL``; nodes started the vllm-metal way advertise ``mlx``; and plain ``ray start`` on
an Apple Silicon Mac advertises Ray's own ``GPU`` (Ray's ``AppleGPUAcceleratorManager``,
which also labels the node ``accelerator_type:M2-Max`` and the like). ``auto`` picks the
first of those any alive node advertises; ``VLLM_RAY_METAL_RAY_KEY`` names one instead.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from vllm_ray_metal import envs
from vllm_ray_metal.distributed.cluster import NodeInfo, PlacementError, node_table

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers

AUTO = "auto"
KEYS = ("METAL", "mlx", "GPU")  # auto's order
DEFAULT = "METAL"  # what a cluster we start ourselves advertises
APPLE_CHIP = re.compile(r"^accelerator_type:M\d+(-(Pro|Max|Ultra))?$")


@dataclass(frozen=True)
class KeyChoice:
    key: str
    reason: str


def explicit() -> str | None:
    """The key ``VLLM_RAY_METAL_RAY_KEY`` names, or None for ``auto``."""
    value = envs.VLLM_RAY_METAL_RAY_KEY
    return None if value.lower() == AUTO else value


def is_apple(node: NodeInfo) -> bool:
    """Whether Ray detected an Apple Silicon GPU on the node (its chip label)."""
    return any(APPLE_CHIP.match(name) for name in node.resources)


def choose(nodes: list[NodeInfo]) -> KeyChoice:
    """The key the executor uses on these nodes, and why."""
    named = explicit()
    if named:
        return KeyChoice(named, f"VLLM_RAY_METAL_RAY_KEY={named}")
    alive = [n for n in nodes if n.alive]
    for key in KEYS:
        having = [n.address for n in alive if n.units(key) >= 1]
        if having:
            how = {"METAL": "nodes started with `vllm-ray-metal start`",
                   "mlx": "nodes started the vllm-metal way",
                   "GPU": "Ray's own Apple GPU detection: plain `ray start` on a Mac"}[key]
            return KeyChoice(key, f"{key} is advertised by {', '.join(having)} ({how}); "
                                  f"auto takes the first of {', '.join(KEYS)} any node has")
    return KeyChoice(DEFAULT, f"no alive node advertises any of {', '.join(KEYS)}")


def check(nodes: list[NodeInfo], choice: KeyChoice) -> None:
    """Refuse a GPU cluster that mixes Macs and other machines; warn of unused nodes."""
    alive = [n for n in nodes if n.alive]
    key = choice.key
    if key == "GPU":
        apple = [n for n in alive if n.units("GPU") >= 1 and is_apple(n)]
        other = [n for n in alive if n.units("GPU") >= 1 and not is_apple(n)]
        if apple and other:
            raise PlacementError(
                f"The cluster's GPU nodes are not all Macs: GPU without an Apple chip on "
                f"{', '.join(n.address for n in other)}, beside the Macs "
                f"{', '.join(n.address for n in apple)}; MLX workers run on Apple Silicon only."
                f"\nNodes:\n{node_table(nodes, key)}\nFix: start the Macs with "
                "`vllm-ray-metal start` (they then advertise METAL, which the executor "
                "prefers), or remove the other nodes.")
    unused = [n for n in alive if n.units(key) < 1 and any(n.units(k) >= 1 for k in KEYS)]
    if unused:
        logger.warning(
            "Using Ray resource %r (%s); these nodes advertise only %s and get no MLX "
            "worker: %s. Start every node the same way, or set VLLM_RAY_METAL_RAY_KEY.",
            key, choice.reason, "/".join(k for k in KEYS if k != key),
            ", ".join(n.address for n in unused))


def adopt(key: str) -> None:
    """Declare ``key`` as this process's platform key (vLLM reads ``ray_device_key``)."""
    from vllm.platforms import current_platform

    current_platform.ray_device_key = key


def resolve(nodes: list[NodeInfo] | None = None) -> KeyChoice:
    """Choose the key for the connected cluster, check it, and adopt it in this process."""
    from vllm_ray_metal.distributed import cluster

    nodes = cluster.list_nodes() if nodes is None else nodes
    choice = choose(nodes)
    check(nodes, choice)
    adopt(choice.key)
    logger.info("MLX workers use the Ray resource %r: %s", choice.key, choice.reason)
    return choice
