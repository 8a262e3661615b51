"""What whoever places a worker tells it, in one serialised value.

vLLM builds the worker inside its own actor (``WorkerWrapperBase``), so the executor
cannot hand it arguments; it sends this spec in the worker's environment instead, one
JSON variable, and the worker reads it once. Without an executor (vLLM's in-process
backend) the worker is one rank alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from vllm_ray_metal import envs

ENV = "VLLM_RAY_METAL_WORKER_SPEC"


@dataclass(frozen=True)
class WorkerSpec:
    mlx_hosts: list[str] = field(default_factory=list)  # "ip:port" of every rank's ring peer
    ranks_on_node: int = 1  # MLX ranks the worker's Ray node hosts (its cores' share)
    ranks_on_host: int = 1  # MLX ranks on its machine (loopback raylets share one)

    def to_env(self) -> dict[str, str]:
        return {ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> "WorkerSpec":
        raw = envs.VLLM_RAY_METAL_WORKER_SPEC
        return cls(**raw) if raw else cls()
