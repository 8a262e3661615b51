"""Every environment variable vllm-ray-metal reads: name, type, default and meaning.

Read them as attributes (``envs.VLLM_RAY_METAL_RAY_KEY``), evaluated at each access like
``vllm.envs``. The platform registers :data:`environment_variables` with vLLM, so vLLM's
check for unknown ``VLLM_*`` variables knows ours. Standard library only: every process
imports this, Ray's plugin loader and the node CLI included.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


def _flag(raw: str, default: bool) -> bool:
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    return default


def _optional_int(raw: str) -> int | None:
    return max(1, int(raw)) if raw.strip() else None


def _cache(raw: str) -> Path:
    if raw.strip():
        return Path(raw).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "vllm-ray-metal"


@dataclass(frozen=True)
class Variable:
    name: str
    type: str  # as documented: bool, str, float, int, path, json
    default: str  # what an unset variable means, in words
    meaning: str
    parse: Callable[[str], Any]
    internal: bool = False  # set by the library for its own processes, not by users

    def read(self) -> Any:
        return self.parse(os.environ.get(self.name, ""))


def _float(default: float, name: str) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            return float(raw) if raw.strip() else default
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number") from None
    return parse


VARIABLES: tuple[Variable, ...] = (
    Variable("VLLM_RAY_METAL_DISABLE", "bool", "off",
             "`1` switches the platform plugin off: stock vLLM",
             lambda raw: _flag(raw, False)),
    Variable("VLLM_RAY_METAL_RAY_KEY", "str", "`auto`",
             "the Ray resource each worker asks for; `auto`: the one with the most units "
             "among `METAL`, `mlx` and Ray's `GPU` (plain `ray start` on a Mac)",
             lambda raw: raw.strip() or "auto"),
    Variable("VLLM_RAY_METAL_AUTO_RAY", "bool", "on",
             "`0`: `\"ray\"` and an initialised Ray no longer select `RayMetalExecutor`",
             lambda raw: _flag(raw, True)),
    Variable("VLLM_RAY_METAL_PLACEMENT_TIMEOUT", "float", "`60`",
             "seconds to wait for a placement group the cluster could hold (one it cannot "
             "fails at once)",
             _float(60.0, "VLLM_RAY_METAL_PLACEMENT_TIMEOUT")),
    Variable("VLLM_RAY_METAL_DRIVER_NODE_IP", "str", "Ray's",
             "the Ray node address of the process running the engine, when its default "
             "route is not one (the library also sets it for the engine process it spawns)",
             lambda raw: raw.strip() or None),
    Variable("VLLM_RAY_METAL_MLX_BACKEND", "str", "`ring`",
             "MLX collectives for TP/PP: `ring` (TCP), or `jaccl` (RDMA over Thunderbolt 5, "
             "macOS; untested here)",
             lambda raw: raw.strip() or "ring"),
    Variable("VLLM_RAY_METAL_MQ_SPIN_S", "float", "`0`",
             "seconds the engine busy-waits for worker output before sleeping on a "
             "notification (vLLM: 1 s, which takes a core from the step on a CPU backend)",
             _float(0.0, "VLLM_RAY_METAL_MQ_SPIN_S")),
    Variable("VLLM_RAY_METAL_KV_MIRROR", "float", "`0.5`",
             "share of the KV budget kept for the contiguous copy of the running requests' "
             "KV that attention reads in place (the rest holds vLLM's blocks); `0`: "
             "attention gathers each context from the blocks every step",
             lambda raw: min(0.9, max(0.0, _float(0.5, "VLLM_RAY_METAL_KV_MIRROR")(raw)))),
    Variable("VLLM_RAY_METAL_SPEC_DRAFTS", "str", "`measure`",
             "speculative decoding: `measure` offers drafts only while the runner measured "
             "them to win tokens per second on this device; `always` offers them every "
             "step (as vLLM does)",
             lambda raw: raw.strip().lower() or "measure"),
    Variable("VLLM_RAY_METAL_CACHE", "path", "`~/.cache/vllm-ray-metal`",
             "where the default model and the BLAS shim are built",
             _cache),
    Variable("VLLM_RAY_METAL_CPU_TUNING", "str", "`1`",
             "Linux CPU backend only: `0` turns every CPU-only speed-up off (the code a Mac "
             "runs, on MLX's bundled BLAS); `blas` keeps only the optimised BLAS library",
             lambda raw: {"": "1", **{v: "1" for v in TRUE}, **{v: "0" for v in FALSE}}.get(
                 raw.strip().lower(), raw.strip().lower())),
    Variable("VLLM_RAY_METAL_BLAS", "str", "OpenBLAS + shim, else MKL, else system OpenBLAS",
             "Linux: a BLAS library path for MLX's CPU backend, `mkl`, or `none`",
             lambda raw: raw.strip()),
    Variable("VLLM_RAY_METAL_BLAS_THREADS", "int", "cores ÷ key units on the node",
             "Linux: BLAS threads per worker (Ray gives actors `OMP_NUM_THREADS=1`)",
             _optional_int),
    Variable("VLLM_RAY_METAL_BLAS_KERNEL", "str", "the best the CPU runs",
             "Linux x86: the shim's few-row kernel, `avx512`, `avx2` or `none` (OpenBLAS for "
             "every product)",
             lambda raw: raw.strip().lower() or None),
    Variable("VLLM_RAY_METAL_WORKER_SPEC", "json", "one rank alone",
             "what the executor tells each worker (MLX ring peers, ranks sharing its node "
             "and machine); see `engine/spec.py`",
             lambda raw: json.loads(raw) if raw.strip() else None, internal=True),
    Variable("VLLM_RAY_METAL_DP_PACK_CHOSEN", "str", "unset",
             "the `VLLM_RAY_DP_PACK_STRATEGY` value the library chose (so a later engine in "
             "the process chooses again, while a user's choice is kept)",
             lambda raw: raw.strip() or None, internal=True),
    Variable("VLLM_RAY_METAL_VISIBLE_DEVICES", "str", "unset",
             "the platform's `device_control_env_var`, which vLLM sets in each worker",
             lambda raw: raw.strip() or None, internal=True),
)

BY_NAME: dict[str, Variable] = {v.name: v for v in VARIABLES}
# vLLM's shape (vllm.envs.environment_variables): name -> reader
environment_variables: dict[str, Callable[[], Any]] = {v.name: v.read for v in VARIABLES}


def __getattr__(name: str) -> Any:
    if name in BY_NAME:
        return BY_NAME[name].read()
    raise AttributeError(name)


def __dir__() -> list[str]:
    return sorted([*globals(), *BY_NAME])


def cache_root() -> Path:
    """The per-user cache directory (``VLLM_RAY_METAL_CACHE``)."""
    return BY_NAME["VLLM_RAY_METAL_CACHE"].read()


def cpu_tuning() -> str:
    """``1`` (all CPU speed-ups), ``blas`` (only the BLAS library) or ``0`` (none)."""
    value = BY_NAME["VLLM_RAY_METAL_CPU_TUNING"].read()
    if value not in ("1", "0", "blas"):
        raise ValueError(f"VLLM_RAY_METAL_CPU_TUNING={value!r}: use 1, 0 or blas")
    return value
