"""MLX model runner: turns vLLM scheduler outputs into mlx-lm forward passes.

The scheduler decides everything that is policy (which requests run, how many prompt
tokens a chunk has, which blocks hold which tokens, prefix-cache hits, preemption); the
runner keeps just enough per-request state to know the token ids to feed and samples
the next token when a request's scheduled tokens reach the end of what is known.

Each step runs every decoding request (one new token each, plus any speculative drafts
to verify) in one batched MLX call; prefill chunks of near-equal length share a call, so no request pays for much padding
(see ``_forward_groups`` for the order, which same-step prefix-cache hits constrain).
"""

from __future__ import annotations

import logging
import time

import mlx.core as mx
import numpy as np
import torch

from vllm_ray_metal import cpu, envs
from vllm_ray_metal.compat import vllm as compat_vllm
from vllm_ray_metal.engine import (draft, grammar, logprobs, lora, model_loader, pipeline,
                                   pooling, sampler, speculative, step_plan)
from vllm_ray_metal.engine.kv_cache import PagedKVPool, build_layout
from vllm_ray_metal.engine.kv_mirror import KVMirror, slot_rows
from vllm_ray_metal.engine.requests import RequestState, Row, Step

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's log handlers

TORCH_TO_MLX = {torch.float32: mx.float32, torch.float16: mx.float16,
                torch.bfloat16: mx.bfloat16}


class MLXModelRunner:
    def __init__(self, vllm_config, group=None) -> None:
        self.vllm_config = vllm_config
        self.group = group  # MLX group for tensor parallelism (None: one rank)
        self.model_config = vllm_config.model_config
        self.cache_config = vllm_config.cache_config
        self.block_size = vllm_config.cache_config.block_size
        self.dtype = TORCH_TO_MLX[self.model_config.dtype]
        self.model = None
        self.kv_pool: PagedKVPool | None = None
        self.mirror: KVMirror | None = None
        self.mirror_budget = 0  # bytes of the KV budget kept for the mirror (split_kv_budget)
        self.requests: dict[str, RequestState] = {}
        self._pending: Step | None = None
        seed = self.model_config.seed
        self.default_rng = np.random.default_rng(seed if seed is not None else 0)
        self.vocab_size = self.model_config.get_vocab_size()
        self.stage = pipeline.stage_for(vllm_config)  # None without pipeline parallelism
        self.samples = self.stage is None or self.stage.is_last  # only the last stage samples
        # tensor parallel without pipeline stages: split the output projection by vocabulary
        # (with stages, the one global group also spans ranks that hold no output matrix)
        self.vocab_group = group if self.stage is None else None
        self.proposer = speculative.proposer_for(vllm_config, self.dtype)  # None: no drafts
        self.draft = self.proposer if isinstance(self.proposer, draft.DraftModel) else None
        self.draft_policy = speculative.DraftPolicy(envs.VLLM_RAY_METAL_SPEC_DRAFTS)
        self._drafts = None  # the last step's proposals, until take_draft_token_ids
        self.lora: lora.LoRASlots | None = None  # with --enable-lora

    # ---- set-up -------------------------------------------------------------------
    def load_model(self) -> None:
        dtype_name = str(self.model_config.dtype).removeprefix("torch.")
        model, revision = self.model_config.model, self.model_config.revision
        if self.stage is not None:
            self.model = pipeline.load_stage(model, dtype_name, self.group, self.stage,
                                             revision)
        else:
            self.model = model_loader.load(model, dtype_name, self.group, revision)
        if self.vllm_config.lora_config is not None:  # (layer types read before CPU wrappers)
            tp = self.vllm_config.parallel_config.tensor_parallel_size
            self.lora = lora.LoRASlots(self.model, self.vllm_config.lora_config, self.dtype,
                                       self.stage_layers()[0],
                                       self.model_config.get_total_num_hidden_layers(),
                                       self.stage.tp_rank if self.stage else
                                       (self.group.rank() if self.group else 0), tp)
        tuned = cpu.install(self.model, self.dtype)  # Linux CPU backend only; {} on Metal
        if self.lora is not None:
            tuned = {**tuned, "lora": self.lora.wrap()}
        self.weight_bytes = model_loader.parameter_bytes(self.model)  # (with LoRA slots)
        self.layer_weight_bytes = model_loader.parameter_bytes(self.model.model.layers,
                                                               base_only=True)
        self.lora_bytes = self.weight_bytes - model_loader.parameter_bytes(self.model,
                                                                           base_only=True)
        self.draft_bytes = 0
        if self.draft is not None:
            draft_tuned = self.draft.load()
            self.draft_bytes = self.draft.weight_bytes
            logger.info("Loaded draft model %s (%.1f MiB of weights; CPU wrappers: %s)",
                        self.draft.config.model, self.draft_bytes / 2**20,
                        draft_tuned or "none")
        logger.info("Loaded %s with mlx-lm (%.1f MiB of weights, %.1f MiB of them LoRA "
                    "slots; CPU wrappers: %s)", self.model_config.model,
                    self.weight_bytes / 2**20, self.lora_bytes / 2**20, tuned or "none")

    def stage_layers(self) -> tuple[int, int]:
        """[start, end) of the decoder layers this rank runs."""
        if self.stage is not None:
            return self.stage.start, self.stage.end
        return 0, self.model_config.get_total_num_hidden_layers()

    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, KV heads, head size) of this worker's share of the model."""
        parallel = self.vllm_config.parallel_config
        return (self.model_config.get_num_layers(parallel),
                self.model_config.get_num_kv_heads(parallel),
                self.model_config.get_head_size())

    def get_kv_cache_spec(self) -> dict:
        layers, kv_heads, head_size = self.kv_layout()
        spec = compat_vllm.full_attention_spec(self.block_size, kv_heads, head_size,
                                          self.model_config.dtype)
        first = self.stage.start if self.stage is not None else 0  # global layer numbers
        return {f"model.layers.{first + i}.self_attn": spec for i in range(layers)}

    def split_kv_budget(self, budget: int, bytes_per_block: int) -> int:
        """The paged pool's share of the KV budget (what vLLM is told); the draft model's
        pool (as many blocks, its own bytes per block) and the mirrors
        (``VLLM_RAY_METAL_KV_MIRROR``, the same share of the target's and the draft's
        bytes) keep the rest, a mirror never so much that one max-length request would no
        longer fit the pool."""
        if self.draft is not None:
            draft_block = self.draft.bytes_per_block()
            budget = budget * bytes_per_block // (bytes_per_block + draft_block)
        share = envs.VLLM_RAY_METAL_KV_MIRROR
        max_len = self.model_config.max_model_len
        one_request = (-(-max_len // self.block_size) + 1) * bytes_per_block
        pool = min(budget, max(int(budget * (1 - share)), one_request))
        self.mirror_budget = budget - pool if share > 0 else 0
        return pool

    def initialize_kv_cache(self, kv_cache_config) -> None:
        layers, kv_heads, head_size = self.kv_layout()
        self.kv_pool = PagedKVPool(layers, kv_cache_config.num_blocks, self.block_size,
                                   kv_heads, head_size, self.dtype)
        self.mirror, positions = None, 0
        if self.mirror_budget:
            # Every rank must choose the mirror or the pool alike (the forwards' shapes
            # meet in collectives), so the limit comes from the block count vLLM gave
            # all ranks; one rank alone also keeps to its own bytes.
            share = envs.VLLM_RAY_METAL_KV_MIRROR
            positions = int(kv_cache_config.num_blocks * self.block_size * share / (1 - share))
            if self.vllm_config.parallel_config.world_size == 1:
                per_position = self.kv_pool.bytes_per_block // self.block_size
                positions = min(positions, self.mirror_budget // per_position)
            self.mirror = KVMirror(self.kv_pool, positions)
        if self.draft is not None:  # (its mirror: the same share of its own bytes per block)
            self.draft.init_pool(kv_cache_config.num_blocks, positions)
        logger.info("Paged KV cache: %d blocks of %d tokens (%.1f MiB at full size); "
                    "mirror for attention: %d positions at most",
                    kv_cache_config.num_blocks, self.block_size,
                    kv_cache_config.num_blocks * self.kv_pool.bytes_per_block / 2**20,
                    positions)

    def warm_up(self) -> None:
        """One real forward on the null block: loads kernels and BLAS before serving."""
        layout = build_layout([0], [1], [[0]], self.block_size)
        if self.lora is not None:
            self.lora.set_rows([0])
        hidden = self.model.model(mx.array([[0]]), cache=self.kv_pool.layer_caches(layout))
        if self.samples:
            hidden = model_loader.compute_logits(self.model, hidden[:, -1], self.vocab_group)
        mx.eval(hidden, self.kv_pool.arrays())
        if self.draft is not None:
            self.draft.warm_up()

    # ---- per step ------------------------------------------------------------------
    def _update_states(self, so) -> None:
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
            self._forget(req_id)
        for new in so.scheduled_new_reqs:
            params = new.sampling_params
            if new.prompt_token_ids is None:
                raise ValueError("vllm-ray-metal runs token prompts only (no prompt "
                                 "embeddings)")  # (refused at configuration time)
            seed = getattr(params, "seed", None)
            state = RequestState(
                req_id=new.req_id, prompt_token_ids=list(new.prompt_token_ids),
                sampling_params=params, block_ids=list(new.block_ids[0]),
                num_computed_tokens=new.num_computed_tokens,
                generator=np.random.default_rng(seed) if seed is not None else None,
                lora_request=new.lora_request)
            self.requests[new.req_id] = state
            if params is None:
                state.pooled = pooling.start(new.pooling_params,
                                             self.model_config.pooler_config)
                continue
            if params.prompt_logprobs is not None:
                k = params.prompt_logprobs
                state.num_prompt_logprobs = self.vocab_size if k == -1 else k
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests[req_id]
            state.num_computed_tokens = cached.num_computed_tokens[i]
            if req_id in cached.all_token_ids:  # re-sent after a pause or preemption
                state.output_token_ids = cached.all_token_ids[req_id][len(state.prompt_token_ids):]
            else:
                del state.output_token_ids[cached.num_output_tokens[i]:]
            if cached.new_token_ids:  # pipeline parallel: tokens sampled by the last stage
                pipeline.apply_new_token_ids(state, cached.new_token_ids[i])
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_blocks[0])
                # new blocks: the draft's KV is only what its prefix cache holds
                state.draft_computed, state.draft_proposed, state.draft_recorded = 0, [], 0
                self._forget(req_id)  # new blocks: mirror slots are refilled from them
            elif new_blocks is not None:
                state.block_ids.extend(new_blocks[0])

    def _forget(self, req_id: str) -> None:
        if self.mirror is not None:
            self.mirror.forget(req_id)
        if self.draft is not None:
            self.draft.forget(req_id)

    def _forward_groups(self, rows: list[Row]) -> list[list[Row]]:
        return step_plan.forward_groups(rows, self.block_size)

    def _place(self, groups: list[list[Row]]) -> list[list[int]] | None:
        """Mirror slots of every row of the step's forwards (None: the pool alone)."""
        if self.mirror is None:
            return None
        return self.mirror.place([[(r.state.req_id, r.start + r.count) for r in g]
                                  for g in groups])

    def _run_group(self, group: list[Row], slots: list[int] | None) -> list[mx.array]:
        """One group's forwards (pieces of a long chunk in turn); each row's hidden
        states [>= count, H]."""
        lo, where, width = slot_rows(slots, len(group))  # where each row sits in the batch
        batch: list[Row | None] = [None] * width  # (dummies in the gaps of the slot range)
        for r, b in zip(group, where):
            batch[b] = r
        parts: list[list[mx.array]] = [[] for _ in group]
        pieces = step_plan.pieces(group, self.block_size)
        for piece in pieces:
            rows = list(batch)
            for b, r in zip(where, piece):
                rows[b] = r
            hidden = self._forward(rows, lo)
            for i, b in enumerate(where):
                if piece[i].count:
                    parts[i].append(hidden[b, :piece[i].count] if len(pieces) > 1
                                    else hidden[b])
            if len(pieces) > 1:
                mx.eval([p[-1] for p in parts if p], self.kv_pool.arrays(),
                        self.mirror.arrays() if lo is not None else [])
        return [p[0] if len(p) == 1 else mx.concatenate(p) for p in parts]

    def _forward(self, rows: list[Row | None], lo: int | None) -> mx.array:
        """Run rows of new tokens through the model; return hidden states [B, L, H].

        ``lo``: the first mirror slot (rows are slots ``lo ...``, None a dummy slot);
        None: the rows read their contexts from the paged pool.
        """
        starts = [r.start if r else 0 for r in rows]
        counts = [r.count if r else 0 for r in rows]
        width = max(counts)
        tokens = np.zeros((len(rows), width), dtype=np.int32)
        for b, r in enumerate(rows):
            if r is not None and r.count:
                tokens[b, :r.count] = r.token_ids()
        layout = build_layout(starts, counts, [r.state.block_ids if r else [] for r in rows],
                              self.block_size)
        if self.lora is not None:
            self.lora.set_rows([r.state.lora_id if r else 0 for r in rows])
        if lo is None:
            caches = self.kv_pool.layer_caches(layout)
        else:
            caches = self.mirror.layer_caches(layout, lo, [
                (r.state.req_id, r.start, r.count, r.state.block_ids) if r else None
                for r in rows])
        return self.model.model(mx.array(tokens), cache=caches)

    def _logits(self, hidden: mx.array) -> mx.array:
        return model_loader.compute_logits(self.model, hidden, self.vocab_group)

    def execute_model(self, so, defer: bool = False):
        """Run the step's forwards; sample now, or (``defer``) when ``sample_tokens`` brings
        the grammar bitmask (vLLM's two-phase step: structured outputs, pipeline stages)."""
        if self._pending is not None:
            raise RuntimeError("execute_model was called again before sample_tokens: vLLM's "
                               "two-phase step lost a step's output")
        started = time.perf_counter()
        self._update_states(so)
        req_ids = list(so.num_scheduled_tokens)
        if not req_ids:
            return compat_vllm.empty_model_runner_output()
        spec = so.scheduled_spec_decode_tokens or {}
        rows = []
        for index, req_id in enumerate(req_ids):
            state = self.requests[req_id]
            rows.append(Row(state, state.num_computed_tokens,
                             so.num_scheduled_tokens[req_id], index,
                             list(spec.get(req_id, ()))))
        decoding = all(r.known == 1 and r.start + 1 == r.state.num_tokens
                       and r.state.pooled is None for r in rows)
        if self.lora is not None:  # every adapter of the step in a slot
            self.lora.activate({r.state.lora_id: r.state.lora_request for r in rows
                                if r.state.lora_request is not None})
        groups = self._forward_groups(rows)
        placed = self._place(groups)

        to_sample: list[Row] = []
        last_hidden: list[mx.array] = []
        prompt_logprobs: dict = {}
        pooled: list | None = None
        for g, group in enumerate(groups):
            hidden = self._run_group(group, placed[g] if placed is not None else None)
            for b, r in enumerate(group):
                if r.state.pooled is not None:
                    pooled = pooled if pooled is not None else [None] * len(rows)
                    pooled[r.index] = self._pool(r, hidden[b])
                    continue
                if self.samples and r.state.num_prompt_logprobs is not None:
                    logprobs.prompt_chunk(r.state, r.start, r.known, hidden[b],
                                          self._logits, prompt_logprobs)
                # (the next step's num_computed_tokens rolls back rejected drafts)
                r.state.num_computed_tokens = r.start + r.count
                if self.samples and r.start + r.known >= r.state.num_tokens:
                    to_sample.append(r)
                    last_hidden.append(hidden[b][r.known - 1:r.count])  # + draft positions
            mx.eval(last_hidden, self.kv_pool.arrays(),
                    self.mirror.arrays() if self.mirror is not None else [],
                    [r.state.pooled.total for r in group
                     if r.state.pooled is not None and r.state.pooled.total is not None])
        logits = None
        if to_sample:
            logits = self._logits(mx.concatenate(last_hidden))
        if pooled is not None:
            pooled = pooling.to_torch(pooled)
        self._pending = Step(req_ids, len(rows), to_sample, logits, prompt_logprobs, pooled,
                             {req_id: len(d) for req_id, d in spec.items()},
                             so.num_spec_tokens_to_schedule, started, decoding)
        return None if defer else self.sample_tokens(None)

    def sample_tokens(self, grammar_output):
        """Sample the rows the last ``execute_model`` left, under the grammar bitmask."""
        step, self._pending = self._pending, None
        if step is None:
            raise RuntimeError("sample_tokens was called without a step from execute_model")
        sampled: list[list[int]] = [[] for _ in range(step.num_rows)]
        sample_logprobs = None
        if step.to_sample:
            logits = step.logits
            mask = grammar.step_bitmask(grammar_output,
                                        [r.state.req_id for r in step.to_sample],
                                        step.num_drafts)
            if mask is not None:
                logits = grammar.apply(logits, mask)
            states = [r.state for r in step.to_sample]
            if step.num_drafts:
                tokens, lp = sampler.verify(logits, states,
                                            [r.drafts for r in step.to_sample],
                                            self.default_rng)
            else:
                tokens, lp = sampler.sample(logits, states, self.default_rng)
                tokens = [[t] for t in tokens]
            for r, toks in zip(step.to_sample, tokens):
                r.state.output_token_ids.extend(toks)
                sampled[r.index] = toks
            if lp is not None:
                sample_logprobs = logprobs.in_request_order(
                    lp, [r.index for r in step.to_sample], [len(t) for t in tokens],
                    step.num_rows)
        if self.proposer is not None:  # the next step's drafts of every request that sampled
            self.draft_policy.measure(step, sampled)
            states = [r.state for r in step.to_sample]
            drafts = speculative.next_drafts(self.proposer, states, step.num_spec_tokens,
                                             policy=self.draft_policy)
            self._drafts = compat_vllm.draft_token_ids([s.req_id for s in states], drafts)
        output = compat_vllm.model_runner_output(step.req_ids, sampled, sample_logprobs,
                                                 step.prompt_logprobs, step.pooled)
        if self._drafts is not None:  # (with the output: no round trip to fetch them)
            compat_vllm.attach_drafts(output, self._drafts)
        return output

    def take_draft_token_ids(self):
        """vLLM's executors ask after every step (speculative decoding; RayMetalExecutor
        reads them from the step's output instead); None when nothing to give."""
        drafts, self._drafts = self._drafts, None
        return drafts

    def _pool(self, row: Row, hidden: mx.array):
        """Feed a pooling request's chunk; its embedding once the prompt is complete."""
        state = row.state
        state.num_computed_tokens = row.start + row.count
        state.pooled.add(hidden[:row.count], row.start)
        if state.num_computed_tokens < len(state.prompt_token_ids):
            return None
        return state.pooled.finish(len(state.prompt_token_ids))
