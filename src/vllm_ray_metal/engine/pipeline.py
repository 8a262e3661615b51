"""Pipeline parallelism: each stage holds a contiguous slice of the decoder layers.

The layout is vLLM's: ``rank = pp_rank * tp + tp_rank``; a stage's layers come from
vLLM's own split (``compat.vllm.pp_layer_range``), so KV-cache layer names and per-rank layer
counts are what vLLM's KV-cache manager merges; the executor returns the output of the
first TP rank of the last stage (vLLM's ``_get_output_rank``). The first stage keeps the
embedding, the last the final norm and the output projection; other weights are never
read from disk.

Data plane (one MLX group per process: ``init`` returns a singleton, MLX rank = vLLM rank):

* TP=1: stage s sends its hidden states to stage s+1 with ``mx.distributed.send`` /
  ``recv_like``. Stage neighbours are ring neighbours, the only pairs MLX's ring backend
  can send between.
* TP>1: the ring backend cannot split a group ("[ring] Group split not supported"), so no
  stage has a TP group of its own. Stages run in lockstep on the global group instead:
  every row-parallel all-reduce is a global ``all_sum`` to which the ranks of the other
  stages add zeros, and the hand-off is a global ``all_sum`` filled only by the first TP
  rank of the sending stage. Memory is split across stages; time is not overlapped.

Control plane: every rank gets the same SchedulerOutput. Non-last stages never sample;
they learn sampled tokens from ``CachedRequestData.new_token_ids``, which vLLM's
scheduler sends whenever PP > 1 runs without async scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from vllm_ray_metal.compat import mlx as compat_mlx
from vllm_ray_metal.compat import vllm as compat_vllm
from vllm_ray_metal.engine import hub
from vllm_ray_metal.engine.model_loader import DTYPES

# mlx-lm families whose decoder is exactly embed_tokens -> layers(h, mask, cache) -> norm,
# which StageDecoder re-runs stage by stage (e.g. gemma also scales the embedding, so it
# would run but decode wrongly) and whose sharded layers all-reduce only through
# ShardedToAllLinear (MoE blocks call all_sum themselves, which lockstep cannot count).
FAMILIES = ("llama", "qwen2", "qwen3")


def check_family(model_module) -> None:
    """Reject, at configuration time, a model family the stage decoder cannot run."""
    name = model_module.__name__.rsplit(".", 1)[-1]
    if name not in FAMILIES:
        raise ValueError(
            f"pipeline_parallel_size > 1 supports the mlx-lm families {', '.join(FAMILIES)} "
            f"(and those mapped to them, e.g. mistral); this model is {name!r}. Use "
            "tensor_parallel_size to split it instead, or pipeline_parallel_size=1.")


@dataclass(frozen=True)
class Stage:
    """Where one rank sits in the TP x PP grid and which layers it runs."""

    rank: int
    tp: int
    pp: int
    layer_ranges: tuple[tuple[int, int], ...]  # [start, end) of every stage, vLLM's split

    @property
    def pp_rank(self) -> int:
        return (self.rank // self.tp) % self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def start(self) -> int:
        return self.layer_ranges[self.pp_rank][0]

    @property
    def end(self) -> int:
        return self.layer_ranges[self.pp_rank][1]

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp - 1


def layer_ranges(num_layers: int, pp: int) -> tuple[tuple[int, int], ...]:
    """Every stage's layer range, as vLLM splits them; each stage needs at least one."""
    ranges = tuple(compat_vllm.pp_layer_range(num_layers, r, pp) for r in range(pp))
    if any(end <= start for start, end in ranges):
        raise ValueError(
            f"pipeline_parallel_size={pp} leaves a stage without layers ({list(ranges)} of "
            f"{num_layers} layers); use pipeline_parallel_size <= {num_layers} (or fix "
            "VLLM_PP_LAYER_PARTITION).")
    return ranges


def stage_for(vllm_config) -> Stage | None:
    """This worker's stage (None without pipeline parallelism)."""
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size == 1:
        return None
    num_layers = vllm_config.model_config.get_total_num_hidden_layers()
    return Stage(parallel.rank, parallel.tensor_parallel_size,
                 parallel.pipeline_parallel_size,
                 layer_ranges(num_layers, parallel.pipeline_parallel_size))


class _ShardShape:
    """Size and rank of one stage's TP slice, for ``Model.shard`` to cut weights by.

    Only ``size()``/``rank()`` are read while sharding; the row-parallel layers' all-reduce
    group is then set to the real (global) MLX group.
    """

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


_ROW_PARALLEL = compat_mlx.row_sharded_linears()


class StageDecoder(nn.Module):
    """Stands in for mlx-lm's decoder stack (``model.model``) on one pipeline stage.

    Same call as mlx-lm's (token ids, per-layer caches); returns final-normed hidden states
    on the last stage and the hand-off hidden states elsewhere (already evaluated, so the
    send / collectives of a non-last stage run even though nothing reads the result).
    """

    def __init__(self, inner: nn.Module, stage: Stage, group, hidden_size: int,
                 hidden_dtype: mx.Dtype, keep_embedding: bool) -> None:
        super().__init__()
        self.stage = stage
        self.group = group
        self.hidden_size = hidden_size
        self.hidden_dtype = hidden_dtype
        self.layers = inner.layers
        if keep_embedding:
            self.embed_tokens = inner.embed_tokens
        if stage.is_last:
            self.norm = inner.norm
        self.collectives_per_layer = 0
        if stage.tp > 1:
            dims = [m.weight.shape[0] for _, m in self.layers[0].named_modules()
                    if isinstance(m, _ROW_PARALLEL)]
            if any(d != hidden_size for d in dims):
                raise ValueError("tensor x pipeline parallel needs every row-parallel "
                                 "layer to output hidden-size rows")
            self.collectives_per_layer = len(dims)

    def _run_layers(self, h: mx.array, cache) -> mx.array:
        cache = cache or [None] * len(self.layers)
        mask = compat_mlx.create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, cache=c)
        return h

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        st = self.stage
        shape = (inputs.shape[0], inputs.shape[1], self.hidden_size)
        dtype = self.hidden_dtype
        if st.tp == 1:
            if st.is_first:
                h = self.embed_tokens(inputs)
            else:
                h = mx.distributed.recv_like(mx.zeros(shape, dtype), st.rank - 1,
                                             group=self.group)
            h = self._run_layers(h, cache)
            if st.is_last:
                return self.norm(h)
            h = mx.distributed.send(h, st.rank + 1, group=self.group)
            mx.eval(h)
            return h
        return self._lockstep(inputs, cache, shape, dtype)

    def _lockstep(self, inputs, cache, shape, dtype) -> mx.array:
        """Every rank joins every stage's collectives in order (see the module docstring)."""
        st = self.stage
        link = None  # the latest collective of this rank: chains them into one order

        def zeros() -> mx.array:
            z = mx.zeros(shape, dtype)
            return z if link is None else mx.depends(z, link)

        h = received = None
        for s, (start, end) in enumerate(st.layer_ranges):
            if s == st.pp_rank:
                h = self.embed_tokens(inputs) if s == 0 else received
                h = link = self._run_layers(h, cache)
            else:
                for _ in range(self.collectives_per_layer * (end - start)):
                    link = mx.distributed.all_sum(zeros(), group=self.group)
            if s < st.pp - 1:
                mine = s == st.pp_rank and st.tp_rank == 0
                received = link = mx.distributed.all_sum(h if mine else zeros(),
                                                         group=self.group)
        mx.eval(link)  # the whole chain, even collectives no local output depends on
        return self.norm(h) if st.is_last else h


def load_stage(model: str, dtype: str | None, group, stage: Stage,
               revision: str | None = None) -> nn.Module:
    """Load only this stage's weights with mlx-lm; shard them over the stage's TP ranks."""
    mlx_model = compat_mlx.load_model(hub.local_path(model, revision), lazy=True)
    inner = getattr(mlx_model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        raise ValueError(f"mlx-lm's {type(mlx_model).__module__}.Model has no "
                         "embed_tokens/layers/norm decoder stack; pipeline parallelism "
                         "does not support this model family.")
    inner.layers = inner.layers[stage.start:stage.end]
    if stage.tp > 1:
        mlx_model.shard(_ShardShape(stage.tp_rank, stage.tp))
        for _, module in mlx_model.named_modules():
            if isinstance(module, _ROW_PARALLEL):
                module.group = group
    tied = not hasattr(mlx_model, "lm_head")
    keep_embedding = stage.is_first or (stage.is_last and tied)
    hidden = inner.norm.weight.shape[0]
    hidden_dtype = DTYPES[dtype] if dtype is not None else inner.norm.weight.dtype
    mlx_model.model = StageDecoder(inner, stage, group, hidden, hidden_dtype, keep_embedding)
    if not stage.is_last and not tied:
        del mlx_model.lm_head
    if dtype is not None:
        mlx_model.set_dtype(DTYPES[dtype])
    mx.eval(mlx_model.parameters())
    return mlx_model


def apply_new_token_ids(state, new_ids: list[int]) -> None:
    """Make the request's positions ``num_computed_tokens ...`` hold ``new_ids``.

    vLLM's scheduler sends, with PP, the token ids of every scheduled position; on stages
    that do not sample this is how the last stage's tokens arrive (on the last stage it
    rewrites what the runner appended already).
    """
    prompt_len = len(state.prompt_token_ids)
    start = state.num_computed_tokens
    if start + len(new_ids) <= prompt_len:
        return
    out_start = start - prompt_len
    if out_start > len(state.output_token_ids):
        raise RuntimeError(f"request {state.req_id}: pipeline stage is missing output tokens "
                           f"{len(state.output_token_ids)}..{out_start - 1}")
    del state.output_token_ids[max(0, out_start):]
    state.output_token_ids.extend(new_ids[max(0, -out_start):])
