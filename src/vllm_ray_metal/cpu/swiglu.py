"""SwiGLU's element-wise part through numpy, for MLX's CPU backend.

MLX's Linux wheel runs its element-wise ``exp`` as scalar code, while numpy's float32
``exp`` is vectorised, and MLX arrays expose their buffer to numpy without a copy.
Handing over costs a sync per layer (MLX can no longer build the next ops while it
computes), so small activations keep MLX's own path; :data:`MIN_ELEMENTS` is the cut
measured by an A/B of the decode step (BENCHMARKS.md).

The model code stays mlx-lm's: :func:`install` wraps each decoder layer's ``mlp`` when it
has ``gate_proj``/``up_proj``/``down_proj`` and a probe shows that its activation is
``silu(gate_proj(x)) * up_proj(x)`` (GELU or clamped variants keep their own code).
The wrapper calls the module's own projections, sharded or quantized ones included, and
only replaces the activation. Only float32 activations take the numpy
path (numpy has no bfloat16, and its float16 ``exp`` is not vectorised). Results agree
with MLX's to a few ulps, not bitwise (two ``exp`` implementations); since the path
depends on the step's size, a request's activations can differ by an ulp between running
alone and batched. On Metal nothing is installed: there the activation is one fused GPU
kernel.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MIN_ELEMENTS = 8192  # gate elements (tokens x intermediate width) that take the numpy path


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` for float32 arrays, computed by numpy (evaluates both inputs)."""
    mx.eval(gate, up)
    g, u = np.asarray(gate), np.asarray(up)  # views of MLX's buffers
    out = np.negative(g)
    with np.errstate(over="ignore"):  # exp(-g) = inf for g < -88: silu -> -0.0, as in MLX
        np.exp(out, out=out)
    out += 1.0
    np.divide(g, out, out=out)
    out *= u
    return mx.array(out)


class NumpySwiGLU(nn.Module):
    """Drop-in for an mlx-lm SwiGLU MLP: its projections, numpy's activation."""

    def __init__(self, inner: nn.Module, min_elements: int = MIN_ELEMENTS) -> None:
        super().__init__()
        self.inner = inner
        self.min_elements = min_elements
        self.width = inner.gate_proj.weight.shape[0]  # output features (this rank's share)

    def __call__(self, x: mx.array) -> mx.array:
        mlp = self.inner
        if x.dtype != mx.float32 or x.size // x.shape[-1] * self.width < self.min_elements:
            return mlp(x)
        return mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))


class _Identity(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return x


def _input_width(linear: nn.Module) -> int:
    """Input features of a (possibly quantized) linear layer."""
    width = linear.weight.shape[-1]
    bits = getattr(linear, "bits", None)
    return width * 32 // bits if bits else width


def _computes_swiglu(mlp: nn.Module) -> bool:
    """True if ``mlp``'s activation is ``silu(gate_proj(x)) * up_proj(x)``.

    Probed with ``down_proj`` swapped for an identity: no collective runs (a sharded
    ``down_proj`` all-reduces), so each rank may decide alone. The inputs span small and
    large magnitudes, so a clamped activation (a swiglu limit) is not taken for SwiGLU.
    """
    down = mlp.down_proj
    try:
        mlp.down_proj = _Identity()
        base = mx.random.normal((3, _input_width(mlp.gate_proj)), key=mx.random.key(0))
        for x in (base, base * 100.0):
            want = mlp(x)
            got = silu_mul(mlp.gate_proj(x), mlp.up_proj(x))
            if want.shape != got.shape or want.dtype != mx.float32:
                return False
            scale = max(float(mx.max(mx.abs(want)).item()), 1e-30)
            if float(mx.max(mx.abs(want - got)).item()) > 1e-5 * scale:
                return False
        return True
    except Exception:  # an MLP this probe does not understand keeps its own code
        return False
    finally:
        mlp.down_proj = down


def install(model: nn.Module) -> int:
    """Wrap every SwiGLU ``mlp`` in ``model`` (CPU only); return how many were wrapped.

    Each layer is probed on its own: layers of one model may differ (e.g. a per-layer
    activation limit).
    """
    if mx.default_device() != mx.cpu:
        return 0
    wrapped = 0
    for module in [m for _, m in model.named_modules()]:
        mlp = getattr(module, "mlp", None)
        if all(hasattr(mlp, p) for p in PROJECTIONS) and _computes_swiglu(mlp):
            module.mlp = NumpySwiGLU(mlp)
            wrapped += 1
    return wrapped
