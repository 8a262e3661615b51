"""vLLM's pooling runner on MLX: embeddings from the decoder's final (normed) hidden states.

vLLM turns a causal LM into an embedding model (``--runner pooling``, ``convert=embed``)
with a pooler config: ``LAST``, ``MEAN`` or ``CLS`` pooling of the prompt's hidden
states, then optional Matryoshka truncation (``dimensions``) and L2 normalisation
(``use_activation``). A prompt may arrive in chunks, so each request keeps what its
pooling type needs (the first row, a running sum, the latest row, or every row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
import torch

SEQUENCE_TYPES = ("LAST", "MEAN", "CLS")
TASKS = ("embed", "token_embed")


@dataclass
class Pooled:
    """One request's pooling state across its prompt chunks."""
    task: str
    kind: str  # LAST, MEAN or CLS for "embed"; ALL for "token_embed"
    normalize: bool
    dimensions: int | None
    total: mx.array | None = None  # MEAN: sum so far; CLS/LAST: the chosen row
    rows: list[mx.array] = field(default_factory=list)  # ALL: every chunk

    def add(self, hidden: mx.array, start: int) -> None:
        """Take a chunk's hidden states [count, H] for prompt positions from ``start``."""
        if self.kind == "ALL":
            self.rows.append(hidden)
        elif self.kind == "MEAN":
            part = hidden.astype(mx.float32).sum(axis=0)
            self.total = part if self.total is None else self.total + part
        elif self.kind == "CLS":
            if start == 0:
                self.total = hidden[0]
        else:
            self.total = hidden[-1]

    def finish(self, prompt_len: int) -> mx.array:
        if self.kind == "ALL":
            out = mx.concatenate(self.rows, axis=0).astype(mx.float32)
        elif self.kind == "MEAN":
            out = self.total / prompt_len
        else:
            out = self.total.astype(mx.float32)
        if self.dimensions is not None:
            out = out[..., :self.dimensions]
        if self.normalize:
            norm = mx.sqrt((out * out).sum(axis=-1, keepdims=True))
            out = out / mx.maximum(norm, 1e-12)  # (torch's F.normalize eps)
        return out


def to_torch(pooled: list[mx.array | None]) -> list[torch.Tensor | None]:
    """The step's embeddings as vLLM's output carries them (one host transfer)."""
    mx.eval([p for p in pooled if p is not None])
    return [None if p is None else torch.from_numpy(np.array(p, copy=True)) for p in pooled]


def start(params, pooler_config, num_computed_tokens: int) -> Pooled:
    """The state for a new pooling request; refuse what cannot be pooled exactly."""
    task = params.task or "embed"
    if task not in TASKS:
        raise ValueError(f"pooling task {task!r} is not supported by vllm-ray-metal; "
                         f"use one of {', '.join(TASKS)}")
    kind = pooler_config.get_seq_pooling_type() if task == "embed" else \
        pooler_config.get_tok_pooling_type()
    if kind not in (*SEQUENCE_TYPES, "ALL"):
        raise ValueError(f"pooling type {kind!r} is not supported by vllm-ray-metal; use "
                         "LAST, MEAN or CLS")
    if num_computed_tokens and kind != "LAST":
        raise ValueError(f"{kind} pooling needs the hidden state of every prompt token, "
                         "but a prefix-cache hit skipped some; run pooling models without "
                         "--enable-prefix-caching")
    return Pooled(task, kind, params.use_activation is not False, params.dimensions)
