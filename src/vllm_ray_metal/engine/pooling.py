"""vLLM's pooling runner on MLX: embeddings from the decoder's final (normed) hidden states.

vLLM turns a causal LM into an embedding model (``--runner pooling``, ``convert=embed``)
with a pooler config: ``LAST``, ``MEAN`` or ``CLS`` pooling of the prompt's hidden
states, then optional Matryoshka truncation (``dimensions``) and L2 normalisation
(``use_activation``). A prompt may arrive in chunks, so each request keeps what its
pooling type needs (the first row, a running sum, or the latest row).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import torch

SEQUENCE_TYPES = ("LAST", "MEAN", "CLS")
TASKS = ("embed",)


@dataclass
class Pooled:
    """One request's pooling state across its prompt chunks."""
    kind: str  # LAST, MEAN or CLS
    normalize: bool
    dimensions: int | None
    total: mx.array | None = None  # MEAN: sum so far; CLS/LAST: the chosen row

    def add(self, hidden: mx.array, start: int) -> None:
        """Take a chunk's hidden states [count, H] for prompt positions from ``start``.

        A chunk from position 0 starts over: a preempted request is recomputed from its
        first token (vLLM turns prefix caching off for MEAN and CLS pooling).
        """
        if self.kind == "MEAN":
            part = hidden.astype(mx.float32).sum(axis=0)
            self.total = part if self.total is None or start == 0 else self.total + part
        elif self.kind == "CLS":
            if start == 0:
                self.total = hidden[0]
        else:
            self.total = hidden[-1]

    def finish(self, prompt_len: int) -> mx.array:
        out = self.total / prompt_len if self.kind == "MEAN" else self.total.astype(mx.float32)
        if self.dimensions is not None:
            out = out[..., :self.dimensions]
        if self.normalize:
            norm = mx.sqrt((out * out).sum(axis=-1, keepdims=True))
            out = out / mx.maximum(norm, 1e-12)  # (torch's F.normalize eps)
        return out


def start(params, pooler_config) -> Pooled:
    """The state for a new pooling request (config.py refused what this cannot pool;
    vLLM's front end checked the task, ``dimensions`` and ``use_activation``)."""
    return Pooled(pooler_config.get_seq_pooling_type(), params.use_activation is not False,
                  params.dimensions)


def to_torch(pooled: list[mx.array | None]) -> list[torch.Tensor | None]:
    """The step's embeddings as vLLM's output carries them (one host transfer)."""
    mx.eval([p for p in pooled if p is not None])
    return [None if p is None else torch.from_numpy(np.array(p, copy=True)) for p in pooled]
