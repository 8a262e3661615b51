"""A contiguous copy of the running requests' KV, so attention reads it in place.

The paged pool (:mod:`kv_cache`) is what vLLM's block tables describe, and what prefix
caching and preemption need; but reading a request's context from it means gathering
its scattered blocks into a fresh array in every layer of every step. The mirror keeps,
per layer, keys and values as ``[slots, kv_heads, capacity, head_dim]``: each running
request owns one slot, row ``p`` of it holds position ``p``. A forward writes its new
keys and values to both the pool and the mirror (O(new tokens)), and attention reads a
slice ``[lo:hi, :, :context]`` of the mirror, a view, as mlx-lm's own KVCache does.

What a slot holds is only ever taken from the pool: positions a request has not
written through this mirror (a prefix-cache hit, a resumed request, a slot reassigned)
are copied from its blocks once, just after the forward's own writes to the pool, so a
block written earlier in the same step (or forward) is seen. ``valid[req]`` is how many
leading positions of a slot are right.

A forward covers a contiguous range of slots. Slots in the range that are not rows of
the forward (a finished request's hole, a request prefilling in another forward) run
as dummy rows: their writes go to the spare last position of their slot, which no live
position reaches (capacity stays above every context), and their outputs are dropped.
When a step's forwards cannot be laid out with few dummies, slots are reassigned in
the step's order and refilled from the pool, which costs what one gathered step did.
The mirror's bytes come out of the KV budget (see ``MLXWorker.determine_available_memory``);
a step that would not fit runs on the pool alone.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from vllm_ray_metal.engine.kv_cache import BatchLayout, PagedKVPool, PagedLayerCache

CAPACITY_STEP = 256  # positions added at a time, like mlx-lm's KVCache
SLOT_STEP = 4  # slots added at a time


class KVMirror:
    def __init__(self, pool: PagedKVPool, max_positions: int) -> None:
        self.pool = pool
        self.max_positions = max_positions  # slots x capacity, the same on every rank
        self.bytes_per_position = pool.bytes_per_block // pool.block_size
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
        self.num_slots = 0
        self.capacity = 0
        self.slots: list[str | None] = []
        self.slot_of: dict[str, int] = {}
        self.valid: dict[str, int] = {}

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.capacity * self.bytes_per_position

    def forget(self, req_id: str) -> None:
        """The request finished, or its blocks changed (resumed after preemption)."""
        slot = self.slot_of.pop(req_id, None)
        self.valid.pop(req_id, None)
        if slot is not None:
            self.slots[slot] = None

    def reset(self) -> None:
        self.keys, self.values = [], []
        self.num_slots = self.capacity = 0
        self.slots, self.slot_of, self.valid = [], {}, {}

    # ---- placing a step ---------------------------------------------------------------
    def place(self, groups: list[list[tuple[str, int]]]) -> list[list[int]] | None:
        """Slots for every row of a step's forwards (``(req_id, context end)`` each, in
        forward order), or None when the step does not fit the budget (pool only)."""
        needed = max(end for group in groups for _, end in group) + 1  # + the spare
        capacity = -(-needed // CAPACITY_STEP) * CAPACITY_STEP
        placed = self._keep_and_fill(groups)
        if placed is not None and self._fits(self.num_slots, max(self.capacity, capacity)):
            self._grow(self.num_slots, max(self.capacity, capacity))
            return placed
        # everyone to new slots, in the step's order, in arrays just big enough
        rows = sum(len(g) for g in groups)
        num_slots = -(-rows // SLOT_STEP) * SLOT_STEP
        self.reset()  # (before allocating: the contents are refilled from the pool anyway)
        if not self._fits(num_slots, capacity):
            return None
        placed = self._reassign(groups, num_slots)
        self._grow(num_slots, capacity)
        return placed

    def _fits(self, num_slots: int, capacity: int) -> bool:
        return num_slots * capacity <= self.max_positions

    def _keep_and_fill(self, groups) -> list[list[int]] | None:
        """Rows keep their slots, new rows take free ones; None if a forward's range
        would hold more than a quarter dummies (or a free slot is missing)."""
        free = [s for s, r in enumerate(self.slots) if r is None]
        placed = []
        for group in groups:
            slots = [self.slot_of.get(r) for r, _ in group]
            fresh = [i for i, s in enumerate(slots) if s is None]
            if fresh:
                near = min((s for s in slots if s is not None), default=None)
                run = _free_run(free, len(fresh), near)
                if run is None:
                    return None
                for i, s in zip(fresh, run):
                    slots[i] = s
                    free.remove(s)
            span = max(slots) - min(slots) + 1
            if span - len(slots) > max(1, len(slots) // 4):
                return None
            placed.append(slots)
        for group, slots in zip(groups, placed):
            for (req_id, _), s in zip(group, slots):
                if self.slot_of.get(req_id) != s:
                    self.slot_of[req_id], self.slots[s] = s, req_id
                    self.valid[req_id] = 0
        return placed

    def _reassign(self, groups, num_slots: int) -> list[list[int]]:
        self.slots = [None] * num_slots
        self.slot_of, self.valid = {}, {}
        placed, next_slot = [], 0
        for group in groups:
            slots = list(range(next_slot, next_slot + len(group)))
            for (req_id, _), s in zip(group, slots):
                self.slots[s], self.slot_of[req_id], self.valid[req_id] = req_id, s, 0
            placed.append(slots)
            next_slot += len(group)
        return placed

    def _grow(self, num_slots: int, capacity: int) -> None:
        if (num_slots, capacity) == (self.num_slots, self.capacity):
            return
        heads, dim = self.pool.kv_heads, self.pool.head_dim

        def grown(a: mx.array | None) -> mx.array:
            if a is None:
                return mx.zeros((num_slots * heads * capacity, dim), self.pool.dtype)
            a = a.reshape(self.num_slots, heads, self.capacity, dim)
            pad = [(0, num_slots - self.num_slots), (0, 0), (0, capacity - self.capacity),
                   (0, 0)]
            return mx.pad(a, pad).reshape(-1, dim)

        layers = self.pool.num_layers
        self.keys = self.keys or [None] * layers
        self.values = self.values or [None] * layers
        for store in (self.keys, self.values):
            for i in range(layers):  # one layer at a time: old + new never all at once
                store[i] = grown(store[i])
                mx.eval(store[i])
        self.slots += [None] * (num_slots - len(self.slots))
        self.num_slots, self.capacity = num_slots, capacity

    # ---- one forward --------------------------------------------------------------------
    def layer_caches(self, layout: BatchLayout, lo: int,
                     rows: list[tuple[str, int, int, list[int]] | None]) -> list:
        """Caches for a forward over slots ``lo .. lo + len(rows)``; ``rows`` are
        ``(req_id, start, count, block_ids)`` or None for a dummy slot."""
        write, _ = self.pool.indices(layout)  # (grows the pool if needed)
        heads, cap, bs = self.pool.kv_heads, self.capacity, self.pool.block_size
        pool_slots = self.pool.capacity * bs
        width = layout.write_slots.shape[0] // len(rows)
        dst = np.empty((len(rows), heads, width), np.int64)
        fill_src, fill_dst = [], []
        context = 1
        for b, row in enumerate(rows):
            base = ((lo + b) * heads + np.arange(heads)) * cap  # [H]
            dst[b] = (base + cap - 1)[:, None]  # dummies and padding: the spare position
            if row is None:
                continue
            req_id, start, count, block_ids = row
            dst[b, :, :count] = base[:, None] + np.arange(start, start + count)[None, :]
            have = min(self.valid.get(req_id, 0), start)
            if have < start:  # positions this slot lacks: copy them from the pool once
                pos = np.arange(have, start)
                pool_pos = np.asarray(block_ids, np.int64)[pos // bs] * bs + pos % bs
                fill_src.append((np.arange(heads)[:, None] * pool_slots
                                 + pool_pos[None, :]).reshape(-1))
                fill_dst.append((base[:, None] + pos[None, :]).reshape(-1))
            self.valid[req_id] = start + count
            context = max(context, start + count)
        fill = None
        if fill_src:
            fill = (mx.array(np.concatenate(fill_src).astype(np.int32)),
                    mx.array(np.concatenate(fill_dst).astype(np.int32)))
        view = (lo, lo + len(rows), context)
        mirror_write = mx.array(dst.reshape(-1).astype(np.int32))
        return [MirroredLayerCache(self, i, layout, write, mirror_write, fill, view)
                for i in range(self.pool.num_layers)]

    def arrays(self) -> list[mx.array]:
        return self.keys + self.values


def slot_rows(slots: list[int] | None, n: int) -> tuple[int | None, list[int], int]:
    """A forward's batch for ``n`` rows: over the range of their mirror ``slots`` (slots
    in between run as dummies), or just the rows without slots (None). Returns the first
    slot (None without), where each row sits in the batch, and the batch's width."""
    if slots is None:
        return None, list(range(n)), n
    lo = min(slots)
    return lo, [s - lo for s in slots], max(slots) - lo + 1


def _free_run(free: list[int], n: int, near: int | None) -> list[int] | None:
    """``n`` free slots (sorted): the ``n`` nearest ``near`` when the forward has slotted
    rows, else the first ``n`` consecutive ones; None if there are none."""
    if len(free) < n:
        return None
    if near is not None:
        return sorted(sorted(free, key=lambda s: abs(s - near))[:n])
    for i in range(len(free) - n + 1):
        if free[i + n - 1] - free[i] == n - 1:
            return free[i:i + n]
    return None


class MirroredLayerCache(PagedLayerCache):
    """mlx-lm's cache protocol for one layer: write through, read the mirror in place."""

    def __init__(self, mirror: KVMirror, layer: int, layout: BatchLayout,
                 pool_write: mx.array, mirror_write: mx.array,
                 fill: tuple[mx.array, mx.array] | None, view: tuple[int, int, int]) -> None:
        super().__init__(mirror.pool, layer, layout, pool_write, None)
        self.mirror = mirror
        self.mirror_write = mirror_write
        self.fill = fill
        self.view = view

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        mirror, pool = self.mirror, self.mirror.pool
        stored = pool.write(self.layer, self.write_index, keys, values)
        lo, hi, context = self.view
        out = []
        for store, new, flat_pool in ((mirror.keys, keys, stored[0]),
                                      (mirror.values, values, stored[1])):
            flat = store[self.layer]
            new = new.reshape(-1, new.shape[-1])
            new = new if new.dtype == flat.dtype else new.astype(flat.dtype)
            index = self.mirror_write
            if self.fill is not None:  # after the pool write: same-forward blocks count
                index = mx.concatenate([self.fill[1], index])
                new = mx.concatenate([flat_pool[self.fill[0]], new])
            flat[index] = new
            ctx = flat.reshape(mirror.num_slots, pool.kv_heads, mirror.capacity, -1)
            ctx = ctx[lo:hi, :, :context]
            out.append(ctx if ctx.dtype == keys.dtype else ctx.astype(keys.dtype))
        return out[0], out[1]
