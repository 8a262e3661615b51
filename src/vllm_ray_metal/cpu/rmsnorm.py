"""RMSNorm as one compiled MLX function, for MLX's CPU backend.

On the CPU, ``mx.fast.rms_norm`` has no fused kernel: it expands into 13 primitives
(square, sum, broadcasts, multiplies, rsqrt), each costing a few microseconds of dispatch
whatever its size. ``mx.compile`` fuses the element-wise chain into generated C++ kernels
(built once per machine by the system compiler and cached in MLX's temporary directory;
see jit.py), leaving 4 primitives a norm. The result is bitwise the same (tested).

The model code stays mlx-lm's: :func:`install` replaces each plain ``nn.RMSNorm`` child
(exact type only; Gemma-style ``1 + weight`` norms keep their own code) with
:class:`CompiledRMSNorm`, which keeps the weight under the same name. On Metal nothing is
installed: ``mx.fast.rms_norm`` is one fused GPU kernel there.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from vllm_ray_metal.cpu import jit

_COMPILED: dict[float, Callable[[mx.array, mx.array], mx.array]] = {}
# eps -> compiled norm; shapeless: one trace per eps, ndim and dtype, any sizes


def compiled_norm(eps: float) -> Callable[[mx.array, mx.array], mx.array]:
    """The shapeless compiled ``rms_norm(x, weight, eps)`` for one ``eps``."""
    if eps not in _COMPILED:
        _COMPILED[eps] = mx.compile(lambda x, w: mx.fast.rms_norm(x, w, eps), shapeless=True)
    return _COMPILED[eps]


class CompiledRMSNorm(nn.Module):
    """Drop-in for ``nn.RMSNorm``: same ``weight`` and ``eps``, compiled call."""

    def __init__(self, inner: nn.RMSNorm) -> None:
        super().__init__()
        self.weight = inner.weight
        self.eps = inner.eps
        self._norm = compiled_norm(inner.eps)

    def __call__(self, x: mx.array) -> mx.array:
        return self._norm(x, self.weight)


def install(model: nn.Module) -> int:
    """Replace every plain ``nn.RMSNorm`` in ``model`` (CPU only); return how many."""
    if mx.default_device() != mx.cpu:
        return 0
    targets = [(module, name, child) for _, module in model.named_modules()
               for name, child in module.items() if type(child) is nn.RMSNorm]
    if not targets or not jit.compiler_works():
        return 0
    for module, name, child in targets:
        setattr(module, name, CompiledRMSNorm(child))
    return len(targets)
