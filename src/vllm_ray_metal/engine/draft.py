"""Draft-model speculation: a second, smaller mlx-lm model proposes the next tokens.

The draft runs on every worker, whole (replicated under tensor parallelism: it is small,
and each rank then proposes the same tokens without a collective). Its keys and values
live in a paged pool of its own, addressed by the target's block tables: vLLM reserves
``num_speculative_tokens`` slots past every scheduled row for a draft model, so the
positions the draft writes ahead are always in the request's blocks. Like the target,
the draft reads its contexts from a contiguous mirror of that pool (:mod:`kv_mirror`)
when the KV budget has one, so its one-token forwards do not gather every context from
scattered blocks. A request's draft KV is trusted up to ``RequestState.draft_computed``
tokens: what was fed or proposed and then turned out to be the request's real tokens. A
new request whose prompt hit vLLM's prefix cache starts from the leading blocks the
draft already filled with the same tokens (each full block it filled is recorded with a
hash of every token up to its end), so a long chat's next turn does not run the whole
conversation through the draft. Proposals are the draft's argmax, a deterministic
proposal, so the target's verification (``sampler.verify``) keeps the output
distribution exactly that of non-speculative sampling.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from vllm_ray_metal import cpu
from vllm_ray_metal.engine import model_loader
from vllm_ray_metal.engine.kv_cache import PagedKVPool, build_layout
from vllm_ray_metal.engine.kv_mirror import KVMirror, slot_rows

CATCH_UP_PIECE = 512  # a long catch-up (a new request's prompt) runs in pieces this long
CATCH_UP_BATCHED = 16  # catch-ups up to this long share one forward (accepted drafts)


class DraftModel:
    """The draft checkpoint, its KV pool, and the per-step proposal loop."""

    def __init__(self, draft_config, dtype_name: str, dtype: mx.Dtype, block_size: int,
                 max_model_len: int) -> None:
        self.config = draft_config  # vLLM's ModelConfig of the draft checkpoint
        self.dtype_name, self.dtype = dtype_name, dtype
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.model = None
        self.pool: PagedKVPool | None = None
        self.mirror: KVMirror | None = None
        self.filled: dict[int, int] = {}  # block id -> prefix hash of the tokens it holds
        self._slots: dict[str, int] | None = None  # this proposal's mirror slots

    def load(self) -> dict[str, int]:
        """Load the checkpoint; the CPU room's wrappers it took (as the target's)."""
        self.model = model_loader.load(self.config.model, self.dtype_name, None,
                                       self.config.revision)
        tuned = cpu.install(self.model, self.dtype)  # Linux CPU backend only; {} on Metal
        self.weight_bytes = model_loader.parameter_bytes(self.model)
        return tuned

    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, KV heads, head size): the draft's whole attention, on every rank."""
        return (self.config.get_total_num_hidden_layers(),
                self.config.get_total_num_kv_heads(), self.config.get_head_size())

    def bytes_per_block(self) -> int:
        layers, kv_heads, head_size = self.kv_layout()
        return 2 * layers * kv_heads * head_size * self.dtype.size * self.block_size

    def init_pool(self, num_blocks: int, mirror_positions: int = 0) -> None:
        """As many blocks as the target's pool; ``mirror_positions``: the target mirror's
        (the budget keeps the same share of the draft's bytes for it), 0 for none."""
        layers, kv_heads, head_size = self.kv_layout()
        self.pool = PagedKVPool(layers, num_blocks, self.block_size, kv_heads, head_size,
                                self.dtype)
        self.mirror = KVMirror(self.pool, mirror_positions) if mirror_positions else None

    def forget(self, req_id: str) -> None:
        """The request finished, or was resumed in new blocks."""
        if self.mirror is not None:
            self.mirror.forget(req_id)

    def warm_up(self) -> None:
        layout = build_layout([0], [1], [[0]], self.block_size)
        hidden = self.model.model(mx.array([[0]]), cache=self.pool.layer_caches(layout))
        mx.eval(self._logits(hidden[:, -1]), self.pool.arrays())

    def _logits(self, hidden: mx.array) -> mx.array:
        return model_loader.compute_logits(self.model, hidden)

    def _forward(self, states: list, starts: list[int], rows: list[list[int]] | mx.array
                 ) -> mx.array:
        """Feed each request's tokens (``rows``; or one token each, still on the device)
        from its start; the hidden state of each one's last. With the mirror the forward's
        batch is the requests' slot range (``self._slots``), other slots as dummies."""
        on_device = isinstance(rows, mx.array)
        counts = [1] * len(states) if on_device else [len(r) for r in rows]
        lo, where, width = slot_rows(None if self._slots is None else
                                     [self._slots[s.req_id] for s in states], len(states))
        batch: list = [None] * width  # (state, start, count) of each row of the forward
        for b, s, start, n in zip(where, states, starts, counts):
            batch[b] = (s, start, n)
        if on_device:  # dummy rows feed token 0 (the last of ``padded``)
            index = np.full(width, len(states), np.int32)
            index[where] = np.arange(len(states))
            padded = mx.concatenate([rows.astype(mx.int32), mx.zeros((1,), mx.int32)])
            tokens = padded[mx.array(index)][:, None]
        else:
            fed = np.zeros((width, max(counts)), dtype=np.int32)
            for b, r in zip(where, rows):
                fed[b, :len(r)] = r
            tokens = mx.array(fed)
        layout = build_layout([r[1] if r else 0 for r in batch],
                              [r[2] if r else 0 for r in batch],
                              [r[0].block_ids if r else [] for r in batch], self.block_size)
        if lo is None:
            caches = self.pool.layer_caches(layout)
        else:
            caches = self.mirror.layer_caches(layout, lo, [
                (r[0].req_id, r[1], r[2], r[0].block_ids) if r else None for r in batch])
        hidden = self.model.model(tokens, cache=caches)
        return hidden[mx.array(where), mx.array(counts) - 1]

    def _place(self, states: list, ends: list[int]) -> None:
        """Mirror slots for this proposal's requests (their contexts up to ``ends``), or
        the pool alone when they do not fit the mirror."""
        self._slots = None
        if self.mirror is not None:
            placed = self.mirror.place([[(s.req_id, end) for s, end in zip(states, ends)]])
            if placed is not None:
                self._slots = {s.req_id: slot for s, slot in zip(states, placed[0])}

    def _arrays(self) -> list[mx.array]:
        return self.pool.arrays() + (self.mirror.arrays() if self._slots is not None else [])

    def propose_all(self, states: list, k: int) -> list[list[int]]:
        """Up to ``k`` greedy draft tokens to follow each request's known tokens.

        First every request's draft KV catches up with its known tokens (the accepted
        drafts and the bonus token of the step just verified; a new request's whole
        prompt, in pieces), then ``k - 1`` one-token forwards extend all rows together.
        """
        if not states or k < 1:
            return [[] for _ in states]
        known = [s.token_array() for s in states]
        for s, tokens in zip(states, known):
            s.draft_computed = _still_valid(s, tokens)
            if s.draft_computed == 0:
                s.draft_computed = self._cached_prefix(s, tokens)
        # each row's proposals stay inside the blocks vLLM reserved and the model's length
        room = [max(0, min(k, self.max_model_len - len(t),
                           len(s.block_ids) * self.block_size - len(t) + 1))
                for s, t in zip(states, known)]
        live = [i for i, r in enumerate(room) if r > 0]
        drafts: list[list[int]] = [[] for _ in states]
        if not live:
            return drafts
        self._place([states[i] for i in live], [len(known[i]) + room[i] for i in live])
        # catch up: long ones alone, piece by piece (a new request's prompt would pad every
        # other row to its length), then the short rest in one forward
        last: dict[int, mx.array] = {}  # the hidden state of each row's last known token
        short = [i for i in live
                 if len(known[i]) - states[i].draft_computed <= CATCH_UP_BATCHED]
        for i in sorted(set(live) - set(short)):
            s, tokens = states[i], known[i]
            while s.draft_computed < len(tokens):
                start = s.draft_computed
                end = min(len(tokens), start + CATCH_UP_PIECE)
                last[i] = self._forward([s], [start], [tokens[start:end].tolist()])[0]
                mx.eval(last[i], self._arrays())
                s.draft_computed = end
        if short:
            hidden = self._forward([states[i] for i in short],
                                   [states[i].draft_computed for i in short],
                                   [known[i][states[i].draft_computed:].tolist() for i in short])
            for b, i in enumerate(short):
                last[i] = hidden[b]
                states[i].draft_computed = len(known[i])
        # extend: one token a forward, the rows that still want more; each forward is fed
        # the last one's argmax on the device, queued while the next is being built
        # (mlx-lm's speculative loop does the same), and read back once at the end
        rows = live
        nxt = mx.argmax(self._logits(mx.stack([last[i] for i in live])), axis=-1)
        mx.async_eval(nxt)
        outs = [(rows, nxt)]
        for j in range(1, max(room[i] for i in live)):
            more = [i for i in rows if room[i] > j]
            if more != rows:
                nxt = nxt[mx.array([rows.index(i) for i in more])]
            rows = more
            hidden = self._forward([states[i] for i in rows],
                                   [len(known[i]) + j - 1 for i in rows], nxt)
            nxt = mx.argmax(self._logits(hidden), axis=-1)
            mx.async_eval(nxt)
            outs.append((rows, nxt))
        mx.eval([out for _, out in outs], self._arrays())
        for rows, out in outs:
            for i, t in zip(rows, np.asarray(out).tolist()):
                drafts[i].append(int(t))
        for i in live:
            states[i].draft_proposed = drafts[i]
            self._record(states[i], known[i], room[i])
        return drafts

    def lag(self, states: list) -> int:
        """The most tokens one of these requests has that its draft KV lacks (at most)."""
        return max((s.num_tokens - s.draft_computed for s in states), default=0)

    def _cached_prefix(self, state, tokens: np.ndarray) -> int:
        """Tokens at the start of a request the draft's pool already holds: its leading
        blocks that the draft filled with these very tokens (at least one token is left
        to feed, for the hidden state the first proposal comes from)."""
        hashes = _block_hashes(state, tokens, self.block_size)
        n = 0
        while n < min(len(hashes), len(state.block_ids)) and \
                self.filled.get(state.block_ids[n]) == hashes[n]:
            n += 1
        return min(n * self.block_size, len(tokens) - 1)

    def _record(self, state, tokens: np.ndarray, room: int) -> None:
        """After a proposal: the request's full blocks before its known end hold the draft's
        KV of its real tokens; the blocks it wrote from there on hold proposals."""
        size = self.block_size
        hashes = _block_hashes(state, tokens, size)
        full = min(len(hashes), len(state.block_ids))
        for b in range(state.draft_recorded, full):
            self.filled[state.block_ids[b]] = hashes[b]
        state.draft_recorded = full
        for b in range(full, min(len(state.block_ids), (len(tokens) + room - 2) // size + 1)):
            self.filled.pop(state.block_ids[b], None)


def _block_hashes(state, tokens: np.ndarray, size: int) -> list[int]:
    """The request's full blocks' hashes, each of every token up to the block's end
    (kept on the request, extended as its tokens grow)."""
    hashes = state.draft_hashes
    for b in range(len(hashes), len(tokens) // size):
        hashes.append(hash((hashes[-1] if hashes else 0,
                            tokens[b * size:(b + 1) * size].tobytes())))
    return hashes


def _still_valid(state, tokens: np.ndarray) -> int:
    """How many of the request's tokens its draft KV holds right: those fed before the
    last proposal, and the proposals fed since (all but the last) that were accepted."""
    fed = min(state.draft_computed, len(tokens))
    proposed = state.draft_proposed[:-1]  # the last proposal is never fed
    state.draft_proposed = []
    if not proposed:
        return fed
    real = tokens[fed:fed + len(proposed)]
    same = 0
    while same < len(real) and int(real[same]) == proposed[same]:
        same += 1
    return fed + same
