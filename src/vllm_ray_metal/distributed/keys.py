"""Which Ray resource marks a node's MLX worker slots, chosen from the cluster itself.

Three kinds of clusters reach us: nodes started with ``vllm-ray-metal start`` advertise
``METAL``; nodes started the vllm-metal way advertise ``mlx``; and plain ``ray start`` on
an Apple Silicon Mac advertises Ray's own ``GPU`` (Ray's ``AppleGPUAcceleratorManager``,
which also labels the node ``accelerator_type:M2-Max`` and the like). ``auto`` picks the
one with the most units on alive nodes; ``VLLM_RAY_METAL_RAY_KEY`` names one instead.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from vllm_ray_metal import envs
from vllm_ray_metal.distributed.cluster import (WORKER_KEYS, NodeInfo, PlacementError,
                                                list_nodes, node_table)

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers

AUTO = "auto"
KEYS = WORKER_KEYS  # auto's order on ties
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
    """The key the executor uses on these nodes, and why.

    The key with the most units on alive nodes wins, ties in the order of :data:`KEYS`: a
    Mac started with ``vllm-ray-metal start`` advertises ``METAL`` and Ray's ``GPU``, a
    plain one ``GPU`` only, so a cluster mixing both ways uses ``GPU`` on every Mac.
    """
    named = explicit()
    if named:
        return KeyChoice(named, f"VLLM_RAY_METAL_RAY_KEY={named}")
    alive = [n for n in nodes if n.alive]
    units = {key: sum(int(n.units(key)) for n in alive) for key in KEYS}
    best = max(KEYS, key=lambda k: (units[k], -KEYS.index(k)))
    if units[best] == 0:
        return KeyChoice(DEFAULT, f"no alive node advertises any of {', '.join(KEYS)}")
    how = {"METAL": "nodes started with `vllm-ray-metal start`",
           "mlx": "nodes started the vllm-metal way",
           "GPU": "Ray's own Apple GPU detection: plain `ray start` on a Mac"}[best]
    having = [n.address for n in alive if n.units(best) >= 1]
    return KeyChoice(best, f"{units[best]} unit(s) of {best} on {', '.join(having)} ({how}); "
                           f"auto takes the key with the most units ({', '.join(KEYS)} on ties)")


def check(nodes: list[NodeInfo], choice: KeyChoice) -> None:
    """Refuse a GPU cluster that mixes Macs and other machines; warn of unused nodes."""
    alive = [n for n in nodes if n.alive]
    key = choice.key
    if key == "GPU":
        gpus = [n for n in alive if n.units("GPU") >= 1]
        apple = [n for n in gpus if is_apple(n)]
        other = [n for n in gpus if not is_apple(n) and accelerator_type(n)]
        if apple and other:
            raise PlacementError(
                f"The cluster's GPU nodes are not all Macs: "
                f"{', '.join(f'{n.address} ({accelerator_type(n)})' for n in other)} beside "
                f"the Macs {', '.join(n.address for n in apple)}; MLX workers run on Apple "
                f"Silicon only.\nNodes:\n{node_table(nodes, key)}\nFix: remove the other "
                "machines from this cluster, or start the Macs with `vllm-ray-metal start "
                "--units N` on each and set VLLM_RAY_METAL_RAY_KEY=METAL.")
    for n in alive:
        own = [k for k in KEYS if n.units(k) >= 1]
        if own and key not in own:
            logger.warning(
                "Using Ray resource %r (%s); node %s advertises only %s and gets no MLX "
                "worker. Start every node the same way, or set VLLM_RAY_METAL_RAY_KEY.",
                key, choice.reason, n.address, "/".join(own))


def accelerator_type(node: NodeInfo) -> str:
    """The accelerator Ray labelled the node with (``M2-Max``, ``A100``), or ''."""
    for name in node.resources:
        if name.startswith("accelerator_type:"):
            return name.split(":", 1)[1]
    return ""


def adopt(key: str) -> None:
    """Declare ``key`` as this process's platform key (vLLM reads ``ray_device_key``)."""
    from vllm.platforms import current_platform

    current_platform.ray_device_key = key


def resolve(nodes: list[NodeInfo] | None = None) -> KeyChoice:
    """Choose the key for the connected cluster, check it, and adopt it in this process."""
    nodes = list_nodes() if nodes is None else nodes
    choice = choose(nodes)
    check(nodes, choice)
    adopt(choice.key)
    logger.info("MLX workers use the Ray resource %r: %s", choice.key, choice.reason)
    return choice
