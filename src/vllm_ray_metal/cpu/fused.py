"""One matrix product for the projections of a layer that read the same input (CPU).

A single-sequence decode step multiplies one row by every weight matrix. On MLX's CPU
backend each product is a BLAS call (its threads wake and split the work) plus four
MLX primitives (transpose, flatten, matmul, unflatten), each with a few microseconds of
dispatch. Llama-style layers feed one normalised input to ``q_proj``/``k_proj``/``v_proj``
and one to ``gate_proj``/``up_proj``; with their weights concatenated, a layer's seven
products become four.

The model code stays mlx-lm's: :func:`install` replaces each projection of a group by a
:class:`FusedPart`, which the attention and MLP call exactly as before. The first part
called with an input computes the whole product and splits it; the others return their
slice for the same input object. Groups of exact ``nn.Linear`` are fused, and groups of
MLX's ``AllToShardedLinear`` (tensor parallel's column shards: a local product, whose
all-reduce exists only in the backward pass), so TP=1 and TP=N ranks run the same number
of products; quantized and mixed groups keep their own layers, as do groups that differ in
input width, dtype or bias. On Metal nothing is installed: there a product is one GPU
kernel launch and this was not measured.
"""

from __future__ import annotations

from itertools import accumulate

import mlx.core as mx
import mlx.nn as nn

from vllm_ray_metal.compat import mlx as compat_mlx

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedLinear(nn.Module):
    """The concatenated weights (and biases) of a group of projections."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        super().__init__()
        self.weight = mx.concatenate([lin.weight for lin in linears], axis=0)
        if "bias" in linears[0]:
            self.bias = mx.concatenate([lin.bias for lin in linears], axis=0)
        # plain attribute (an nn.Module would take a list for a parameter): each part's
        # first and last output row, [0, q, q + k, q + k + v]
        object.__setattr__(self, "edges", list(accumulate(
            [lin.weight.shape[0] for lin in linears], initial=0)))
        self._hold(None, [])

    def _hold(self, x: mx.array | None, outputs: list[mx.array]) -> None:
        object.__setattr__(self, "_input", x)
        object.__setattr__(self, "_outputs", outputs)
        object.__setattr__(self, "_left", len(outputs))  # parts not yet handed out

    def part(self, index: int, x: mx.array) -> mx.array:
        """Projection ``index`` of ``x``; the product runs once per input object."""
        if x is not self._input:
            if "bias" in self:
                y = mx.addmm(self.bias, x, self.weight.T)
            else:
                y = x @ self.weight.T
            self._hold(x, mx.split(y, self.edges[1:-1], axis=-1))
        out = self._outputs[index]
        object.__setattr__(self, "_left", self._left - 1)
        if self._left == 0:  # every part taken: hold no arrays between calls
            self._hold(None, [])
        return out


class FusedPart(nn.Module):
    """Stands where one projection was; returns its slice of the group's product."""

    def __init__(self, fused: FusedLinear, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "_fused", fused)  # not a child: weights counted once
        self.index = index

    @property
    def weight(self) -> mx.array:
        """This projection's rows of the fused weight (for code that reads its shape)."""
        edges = self._fused.edges
        return self._fused.weight[edges[self.index]:edges[self.index + 1]]

    def __call__(self, x: mx.array) -> mx.array:
        return self._fused.part(self.index, x)


def _fusable(linears: list) -> bool:
    kinds = {type(lin) for lin in linears}
    if kinds != {nn.Linear} and kinds != {compat_mlx.column_sharded_linear()}:
        return False
    first = linears[0].weight
    return (all(lin.weight.shape[1] == first.shape[1] and lin.weight.dtype == first.dtype
                for lin in linears)
            and len({"bias" in lin for lin in linears}) == 1)


def install(model: nn.Module) -> int:
    """Fuse every fusable projection group in ``model`` (CPU only); return how many."""
    if mx.default_device() != mx.cpu:
        return 0
    fused = 0
    for _, module in list(model.named_modules()):
        for names in GROUPS:
            linears = [module.get(name) for name in names]
            if any(lin is None for lin in linears) or not _fusable(linears):
                continue
            group = FusedLinear(linears)
            mx.eval(group.parameters())  # one group at a time: the old weights go as we go
            setattr(module, "fused_" + "_".join(n.removesuffix("_proj") for n in names), group)
            for index, name in enumerate(names):
                setattr(module, name, FusedPart(group, index))
            fused += 1
    return fused
