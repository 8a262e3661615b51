"""SwiGLU's element-wise part through numpy, for MLX's CPU backend.

MLX's Linux wheel runs its element-wise ``exp`` as scalar code (~30 ns an element), so
``silu(gate) * up`` cost SmolLM2 ~1 ms a layer at 16 rows: ~30 ms of a ~150 ms step.
numpy's float32 ``exp`` is vectorised; the same products take ~70 us a layer there,
including the hand-over (MLX arrays expose their buffer to numpy without a copy; the
result is copied back, 96 KiB at 16 rows).

Handing over costs a sync per layer (MLX can no longer build the next ops while it
computes), so small activations keep MLX's own path. In an interleaved A/B of SmolLM2's
decode step (raw forward, median of 30), numpy's path was 8% slower at 1 row (59 -> 64
ms), even at 4, and faster by 8% at 8, 18% at 16 and 22% at 32 rows (163 -> 134 ms at
16); :data:`MIN_ELEMENTS` is the cut.

The model code stays mlx-lm's: :func:`install` wraps each decoder layer's ``mlp`` when it
has ``gate_proj``/``up_proj``/``down_proj`` and a probe shows that it computes
``down_proj(silu(gate_proj(x)) * up_proj(x))`` (so GELU or clipped variants keep their
own code). The wrapper calls the module's own projections, sharded or quantized ones
included, and only replaces the activation. Only float32 activations take the numpy
path (numpy has no bfloat16, and its float16 ``exp`` is not vectorised). Results agree
with MLX's to a few ulps, not bitwise (two ``exp`` implementations). On Metal nothing is
installed: there the activation is one fused GPU kernel.
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

    def __call__(self, x: mx.array) -> mx.array:
        mlp = self.inner
        if x.dtype != mx.float32:
            return mlp(x)
        gate = mlp.gate_proj(x)  # lazy: nothing is computed twice if MLX's path is taken
        if gate.size < self.min_elements:
            return mlp(x)
        return mlp.down_proj(silu_mul(gate, mlp.up_proj(x)))


def _computes_swiglu(mlp: nn.Module, hidden: int) -> bool:
    """True if ``mlp`` gives what the wrapper gives, on a fixed random float32 input.

    The input is the same on every rank, so under tensor parallelism all ranks make the
    same collective calls and the same decision.
    """
    x = mx.random.normal((2, hidden), key=mx.random.key(0)).astype(mx.float32)
    want = mlp(x)
    got = NumpySwiGLU(mlp, min_elements=0)(x)
    if want.shape != got.shape or want.dtype != mx.float32:
        return False
    scale = float(mx.max(mx.abs(want)).item()) or 1.0
    return float(mx.max(mx.abs(want - got)).item()) <= 1e-5 * scale


def install(model: nn.Module) -> int:
    """Wrap every decoder layer's SwiGLU ``mlp`` (CPU only); return how many were wrapped."""
    if mx.default_device() != mx.cpu:
        return 0
    layers = [m for _, m in model.named_modules()
              if all(hasattr(getattr(m, "mlp", None), p) for p in PROJECTIONS)]
    hidden = getattr(getattr(model, "args", None), "hidden_size", None)
    if not layers or not hidden or len({type(m.mlp) for m in layers}) != 1:
        return 0
    if not _computes_swiglu(layers[0].mlp, int(hidden)):
        return 0
    for layer in layers:
        layer.mlp = NumpySwiGLU(layer.mlp)
    return len(layers)
