"""Tensor parallelism over MLX's distributed collectives (the data plane).

vLLM's message queues stay the control plane: every rank receives the same scheduler
output and runs the same step. Inside a step, mlx-lm's ``Model.shard(group)`` splits
attention heads and MLP columns across ranks and all-reduces the row-parallel outputs,
so every rank ends with identical logits and samples identical tokens.

The group is MLX's ``ring`` backend (TCP: Ethernet, Thunderbolt bridge, loopback) over
peers the executor derives from the Ray nodes the workers run on (the worker spec).
``jaccl`` (RDMA over Thunderbolt 5, macOS only) can be chosen with
``VLLM_RAY_METAL_MLX_BACKEND=jaccl``; it is not testable on Linux and is passed through to
MLX unchanged.
"""

from __future__ import annotations

import sys

from vllm_ray_metal import envs
from vllm_ray_metal.compat import mlx as compat_mlx

BACKEND_ENV = "VLLM_RAY_METAL_MLX_BACKEND"
BACKENDS = ("ring", "jaccl")


def mlx_backend() -> str:
    backend = envs.VLLM_RAY_METAL_MLX_BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "jaccl" and sys.platform != "darwin":
        raise ValueError(f"{BACKEND_ENV}=jaccl needs macOS with RDMA over Thunderbolt; "
                         "use ring here.")
    return backend


def valid_tp_sizes(num_heads: int, num_kv_heads: int) -> list[int]:
    return [n for n in range(1, num_heads + 1) if num_heads % n == 0 and num_kv_heads % n == 0]


def check_tensor_parallel(hf_config, tp: int, model_module) -> None:
    """Reject a TP size MLX cannot shard, naming the sizes that work."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % tp or kv_heads % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} must divide both the attention heads ({heads}) and "
            f"the KV heads ({kv_heads}) for mlx-lm's Model.shard; valid sizes: "
            f"{', '.join(map(str, valid_tp_sizes(heads, kv_heads)))}.")
    if not hasattr(model_module.Model, "shard"):
        raise ValueError(
            f"mlx-lm's {model_module.__name__}.Model has no shard() method, so it cannot run "
            "with tensor_parallel_size > 1; use tensor_parallel_size=1.")


def init_group(rank: int, world_size: int, hosts: list[str]):
    """Join the MLX group over ``hosts`` ("ip:port" per rank; None for one rank)."""
    if world_size == 1:
        return None
    if len(hosts) != world_size:
        raise RuntimeError(f"the worker spec lists {len(hosts)} MLX peers for {world_size} "
                           "ranks")
    group = compat_mlx.init_ring_group(hosts, rank, mlx_backend())
    if group.size() != world_size or group.rank() != rank:
        raise RuntimeError(f"MLX group is rank {group.rank()} of {group.size()}, expected "
                           f"{rank} of {world_size}")
    return group
