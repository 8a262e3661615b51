"""Build the kernels of a model's compiled CPU wrappers before its first forward.

A kernel variant is fixed by dtype, constants and the layout left after MLX merges
contiguous dimensions; the inputs below have the layouts of a model's real calls (tested:
decode and prefill steps of llama and qwen3 build nothing new afterwards). The calls have
no collectives, so holding :func:`jit.kernel_lock` cannot stall a rank that waits in an
all-reduce. Other compiled activations some mlx-lm families use (e.g.
``nn.gelu_approx``) are still built on first use; a rope whose head layout cannot be read
is not compiled.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from vllm_ray_metal.compat import mlx as compat_mlx
from vllm_ray_metal.cpu.jit import kernel_lock
from vllm_ray_metal.cpu.rmsnorm import CompiledRMSNorm
from vllm_ray_metal.cpu.rope import TableRoPE

NORM_SHAPES = ((1, 1), (2, 1), (1, 1, 2), (2, 1, 2), (1, 3, 2), (2, 3, 2))  # before the width


def prebuild(model: nn.Module, dtype: mx.Dtype) -> int:
    """Build the kernels of ``model``'s compiled wrappers now; return how many calls ran.

    ``dtype`` is the activations' dtype (the model's, also when its weights are quantized).
    On Metal, MLX builds its kernels in-process, so there is nothing to do.
    """
    if mx.default_device() != mx.cpu:
        return 0
    swiglu = compat_mlx.compiled_swiglu()
    calls = []
    seen: set[object] = set()  # identical calls build nothing new
    for _, module in model.named_modules():
        if isinstance(module, CompiledRMSNorm) and ("norm", module.eps) not in seen:
            # the residual stream [B, L, hidden], and per-head norms (qwen3's q_norm and
            # k_norm) on [B, L, heads, dim]: MLX builds a variant per layout it is left with
            seen.add(("norm", module.eps))
            width = module.weight.shape[0]
            calls += [module(mx.zeros(shape + (width,), dtype)) for shape in NORM_SHAPES]
        if hasattr(module, "gate_proj") and hasattr(module, "up_proj") and "swiglu" not in seen:
            # mlx-lm's SwiGLU MLPs call its shapeless compiled swiglu on contiguous products
            seen.add("swiglu")
            calls.append(swiglu(mx.zeros((1, 1, 8), dtype), mx.zeros((1, 1, 8), dtype)))
        rope = getattr(module, "rope", None)
        if isinstance(rope, TableRoPE) and rope.compiled:
            layouts = _decode_head_layouts(module)
            if layouts is None:  # cannot build ahead: keep this rope's plain ops
                rope.compiled = False
                continue
            # decode queries and keys: [B, 1, heads, dim] projections seen as [B, heads, 1, dim]
            for rows in (1, 2):
                offset = mx.zeros((rows,), dtype=mx.int32)
                for heads, head_dim in layouts:
                    x = mx.zeros((rows, 1, heads, head_dim), dtype).transpose(0, 2, 1, 3)
                    calls.append(rope(x, offset=offset))
    if calls:
        with kernel_lock():
            mx.eval(calls)
    return len(calls)


def _decode_head_layouts(attention: nn.Module) -> set[tuple[int, int]] | None:
    """(heads, head size) of the queries and keys an attention module ropes, or None.

    Read from the projections' output sizes (also right for quantized and sharded ones);
    mlx-lm's modules name their head counts differently and do not all keep ``head_dim``.
    """
    heads = getattr(attention, "n_heads", None) or getattr(attention, "num_heads", None)
    q_proj, k_proj = getattr(attention, "q_proj", None), getattr(attention, "k_proj", None)
    if not heads or q_proj is None or k_proj is None:
        return None
    head_dim = getattr(attention, "head_dim", None) or q_proj.weight.shape[0] // heads
    kv_heads = k_proj.weight.shape[0] // head_dim
    q_width, k_width = q_proj.weight.shape[0], k_proj.weight.shape[0]
    if q_width != heads * head_dim or k_width != kv_heads * head_dim:
        return None
    return {(heads, head_dim), (kv_heads, head_dim)}
