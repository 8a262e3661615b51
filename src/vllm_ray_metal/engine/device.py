"""The one place that asks MLX what it runs on: a Metal GPU, or the CPU.

Everything that differs between a Mac and the test rig reads it from here, so tests can
stand in a Mac by replacing :func:`query` (one function, one boundary).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Device:
    metal: bool
    name: str  # "Apple M2 Max", or "cpu"
    working_set: int  # bytes MLX may use (Metal's recommended working set; free RAM on CPU)


def query() -> Device:
    """What MLX runs on here."""
    import mlx.core as mx

    if mx.metal.is_available():
        info = mx.device_info()
        return Device(True, str(info.get("device_name", "Apple GPU")),
                      int(info["max_recommended_working_set_size"]))
    return Device(False, "cpu", int(psutil.virtual_memory().available))


def use() -> Device:
    """Make MLX's default device the GPU on a Mac (the CPU elsewhere); return it."""
    import mlx.core as mx

    device = query()
    mx.set_default_device(mx.gpu if device.metal else mx.cpu)
    return device
