"""Rotary embeddings as one table per step, for MLX's CPU backend.

On the CPU, ``mx.fast.rope`` has no fused kernel: each call recomputes the angles and
their sines and cosines, a fixed cost whatever the input size, twice per layer (queries
and keys). Every layer rotates the same positions with the same frequencies, so the runner asks
the model's own rope module once per step for its per-position 2x2 maps (by rotating
two probe vectors) and applies them in each layer with three element-wise products.
Outputs are bitwise the same: ``x1*cos + x2*(-sin)`` rounds like ``x1*cos - x2*sin``.

The model code stays mlx-lm's: :func:`install` only wraps each attention's ``rope``
attribute, and the tables come from that rope itself (base, scale, llama3 frequencies,
partial rotary dims). In a decode step (one new token a row) the products run as one
``mx.compile``d function, fusing the broadcasts, products and sum into one kernel; prefill
chunks keep the plain ops, so the compile cache holds one entry per batch size instead of
one per prompt length. Only ropes that are exactly one ``mx.fast.rope`` call on their
input are wrapped (``nn.RoPE``, mlx-lm's ``Llama3RoPE`` and ``ProportionalRoPE``); ropes
that also scale the input (yarn, su-scaled) keep their own code. On Metal,
``mx.fast.rope`` is one fused kernel and already cheaper than this, so nothing is
installed there.
"""

from __future__ import annotations

import hashlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vllm_ray_metal.compat import mlx as compat_mlx
from vllm_ray_metal.cpu.jit import compiler_works


def signature(rope: nn.Module) -> str:
    """What the rope's tables depend on: its class, settings and frequency arrays.

    Layers whose ropes have equal signatures share one table per step (per-layer rope
    modules of one model are separate objects with equal settings).
    """
    parts = [f"{type(rope).__module__}.{type(rope).__qualname__}"]
    parts += [f"{k}={v!r}" for k, v in sorted(vars(rope).items())
              if isinstance(v, (bool, int, float, str)) or v is None]
    for k in sorted(rope.keys()):  # arrays live in the module's dict
        v = rope[k]
        digest = hashlib.sha1(np.asarray(v).tobytes()).hexdigest() if isinstance(v, mx.array) \
            else f"{id(v)}"  # anything else: never shared
        parts.append(f"{k}={digest}")
    return "|".join(parts)


class StepTables:
    """Per-step rope tables, shared by every layer whose rope has the same configuration."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._offset: mx.array | None = None  # kept alive so its id cannot be reused
        self._tables: dict[tuple, tuple[mx.array, mx.array]] = {}  # (signature, dtype)

    def get(self, wrapper: "TableRoPE", offset: mx.array, length: int, dims: int,
            dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        key = (id(offset), length, dims)
        if key != self._key:
            self._key, self._offset, self._tables = key, offset, {}
        table_key = (wrapper.signature, dtype)
        if table_key not in self._tables:
            self._tables[table_key] = _probe(wrapper, offset, length, dims, dtype)
        return self._tables[table_key]


def _pair_masks(rotated: int, traditional: bool, dims: int) -> tuple[mx.array, mx.array]:
    """0/1 masks of the first and second element of every rotated pair (tail: first)."""
    idx = mx.arange(dims)
    if traditional:  # pairs (2i, 2i+1)
        second = (idx < rotated) & (idx % 2 == 1)
    else:  # pairs (i, i + rotated/2)
        second = (idx >= rotated // 2) & (idx < rotated)
    return (~second).astype(mx.float32), second.astype(mx.float32)


def _swap_pairs(x: mx.array, rotated: int, traditional: bool) -> mx.array:
    """x with the two elements of every rotated pair exchanged (the tail kept in place).

    Slices and a concatenation, not a gather: MLX's CPU gather is several times slower.
    """
    dims = x.shape[-1]
    if traditional:
        pairs = x[..., :rotated].reshape(*x.shape[:-1], rotated // 2, 2)
        swapped = mx.concatenate([pairs[..., 1:], pairs[..., :1]], axis=-1)
        parts = [swapped.reshape(*x.shape[:-1], rotated)]
    else:
        half = rotated // 2
        parts = [x[..., half:rotated], x[..., :half]]
    if rotated < dims:
        parts.append(x[..., rotated:])
    return mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


def _probe(wrapper: "TableRoPE", offset: mx.array, length: int, dims: int, dtype: mx.Dtype
           ) -> tuple[mx.array, mx.array]:
    """(diagonal, off-diagonal) of the rope's 2x2 map at every (row, position).

    Probed in the input's dtype: mx.fast.rope rounds its sines and cosines to it.
    """
    masks = _pair_masks(wrapper.rotated, wrapper.traditional, dims)
    first, second = (m.astype(dtype) for m in masks)
    rows = offset.shape[0] if offset.ndim else 1
    shape = (rows, 1, length, dims)
    rope = wrapper.inner
    r1 = rope(mx.broadcast_to(first, shape), offset=offset)  # column of the first element
    r2 = rope(mx.broadcast_to(second, shape), offset=offset)  # column of the second
    diag = r1 * first + r2 * second
    off = r2 * first + r1 * second
    return diag, off


def _rotate(x: mx.array, diag: mx.array, off: mx.array, rotated: int, traditional: bool
            ) -> mx.array:
    return (x * diag + _swap_pairs(x, rotated, traditional) * off).astype(x.dtype)


_rotate_compiled = mx.compile(_rotate)  # ints and bools are compile-time constants


class TableRoPE(nn.Module):
    """Drop-in for an mlx-lm rope module: same call, tables from :class:`StepTables`."""

    def __init__(self, inner: nn.Module, tables: StepTables, compiled: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.compiled = compiled  # fuse the products of decode steps (needs MLX's compiler)
        self._tables = tables
        self.signature = signature(inner)
        self.rotated = int(inner.dims)  # the classes install() wraps all have these two
        self.traditional = bool(inner.traditional)

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        if not isinstance(offset, mx.array):  # int offsets: mlx-lm's own caches
            return self.inner(x, offset=offset)
        diag, off = self._tables.get(self, offset, x.shape[-2], x.shape[-1], x.dtype)
        rotate = _rotate_compiled if self.compiled and x.shape[-2] == 1 else _rotate
        return rotate(x, diag, off, self.rotated, self.traditional)


def install(model: nn.Module) -> int:
    """Wrap every attention's ``rope`` in ``model`` (CPU only); return how many were wrapped."""
    if mx.default_device() != mx.cpu:
        return 0
    tables = StepTables()
    kinds = compat_mlx.single_call_rope_classes()
    targets = [m for _, m in model.named_modules() if type(getattr(m, "rope", None)) in kinds]
    compiled = bool(targets) and compiler_works()
    for module in targets:
        module.rope = TableRoPE(module.rope, tables, compiled)
    return len(targets)
