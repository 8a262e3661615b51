"""The cpu room's one interface and its switch: off, the model is exactly mlx-lm's."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from vllm_ray_metal import cpu
from vllm_ray_metal.testing.models import mlx_llama

pytestmark = pytest.mark.unit


def module_types(model: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for _, m in model.named_modules()})


@pytest.mark.parametrize("mode", ["0", "blas"])
def test_switched_off_the_model_keeps_mlx_lms_modules(monkeypatch, mode):
    monkeypatch.setenv("VLLM_RAY_METAL_CPU_TUNING", mode)
    model, plain = mlx_llama(), mlx_llama()
    assert cpu.install(model, mx.float32) == {}
    assert module_types(model) == module_types(plain)


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the wrappers are CPU-only")
def test_switched_on_the_wrappers_go_in_and_logits_stay(monkeypatch):
    monkeypatch.setenv("VLLM_RAY_METAL_CPU_TUNING", "1")
    model, plain = mlx_llama(), mlx_llama()
    plain.update(model.parameters())
    counts = cpu.install(model, mx.float32)
    assert counts["rmsnorm"] == 5 and counts["fused"] == 4 and counts["rope"] == 2, counts
    assert "CompiledRMSNorm" in module_types(model) and "FusedPart" in module_types(model)
    tokens = mx.array([[1, 5, 9, 2]])
    assert np.allclose(np.asarray(model(tokens)), np.asarray(plain(tokens)), atol=1e-4)


def test_off_linux_or_with_the_platform_off_nothing_is_tuned(monkeypatch):
    monkeypatch.setattr(cpu, "LINUX", False)
    assert cpu.tuning() == "0"
    assert cpu.setup_process() == "CPU tuning off"
    monkeypatch.setattr(cpu, "LINUX", True)
    monkeypatch.setenv("VLLM_RAY_METAL_DISABLE", "1")
    assert cpu.tuning() == "0" and cpu.preload() is None
