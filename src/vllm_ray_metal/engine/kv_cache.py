"""Paged KV cache laid out by vLLM's block tables, in MLX arrays.

vLLM's scheduler owns the blocks (allocation, prefix caching, preemption); this module
only stores keys and values at the slots those block tables name
(``slot = block_id * block_size + offset``). Every layer has one head-major array for
keys and one for values, stored flat as ``[kv_heads * num_slots, head_dim]``. Writes are MLX
scatters (in place: the old array is donated). Reads gather each sequence's context with
one flat index per (row, head, position), so the result is already the contiguous
``[B, kv_heads, C, head_dim]`` that MLX's fused attention wants: gathering
``[B, C, heads, dim]`` and transposing instead makes attention pay for a strided copy
inside ``scaled_dot_product_attention``.

Block 0 is vLLM's null block, never handed to a request: padding tokens write there and
padding positions read from there, so no other request's data can leak in.

mlx-lm's attention layers talk to a cache object through ``offset``,
``update_and_fetch`` and ``make_mask``; :class:`PagedLayerCache` implements exactly
that protocol, so the model code stays mlx-lm's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

NULL_BLOCK = 0


@dataclass
class BatchLayout:
    """Where one forward pass reads and writes: built once per step, shared by all layers.

    rows are sequences; ``offsets[b]`` is the position of row b's first new token.
    """

    offsets: mx.array  # [B] int32: position of each row's first new token
    write_slots: mx.array  # [B*L] int32: slot for every (row, new token), padding -> null
    read_slots: mx.array  # [B, C] int32: slot for every context position, padding -> null
    mask: mx.array | None  # [B, 1, L, C] bool: which context positions each query may see
    # (None when every query sees its row's whole context: decode steps of rows with equal
    # contexts, e.g. one sequence; attention then skips the mask's ~5 primitives a layer)
    blocks_needed: int  # highest block id referenced + 1 (MLX does not bound-check)


def build_layout(starts: list[int], lengths: list[int], block_tables: list[list[int]],
                 block_size: int) -> BatchLayout:
    """Build slot tables and the attention mask for rows of new tokens.

    Row b holds ``lengths[b]`` new tokens at positions ``starts[b] ...``; it attends to
    positions ``0 .. starts[b] + lengths[b] - 1`` of its own sequence, causally.
    """
    num_rows = len(starts)
    max_len = max(lengths)
    starts_np = np.asarray(starts, dtype=np.int64)
    lengths_np = np.asarray(lengths, dtype=np.int64)
    ctx_np = starts_np + lengths_np
    max_ctx = int(ctx_np.max())

    max_blocks = (max_ctx + block_size - 1) // block_size
    table = np.full((num_rows, max_blocks), NULL_BLOCK, dtype=np.int64)
    for b, blocks in enumerate(block_tables):
        n = min(len(blocks), max_blocks)
        table[b, :n] = blocks[:n]

    def slots_at(positions: np.ndarray, valid: np.ndarray) -> np.ndarray:
        pos = np.where(valid, positions, 0)
        blocks = np.take_along_axis(table, pos // block_size, axis=1)
        slots = blocks * block_size + pos % block_size
        return np.where(valid, slots, NULL_BLOCK * block_size).astype(np.int32)

    q_idx = np.arange(max_len)[None, :]
    q_pos = starts_np[:, None] + q_idx  # [B, L]
    q_valid = q_idx < lengths_np[:, None]
    write = slots_at(q_pos, q_valid)

    k_pos = np.arange(max_ctx)[None, :]  # [1, C]
    k_valid = np.broadcast_to(k_pos < ctx_np[:, None], (num_rows, max_ctx))
    read = slots_at(np.broadcast_to(k_pos, (num_rows, max_ctx)), k_valid)

    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]  # [B, L, C]
    # A padding query row sees position 0 only, so softmax never divides by zero.
    visible |= (~q_valid[:, :, None]) & (k_pos[:, None, :] == 0)
    return BatchLayout(
        offsets=mx.array(starts_np.astype(np.int32)),
        write_slots=mx.array(write.reshape(-1)),
        read_slots=mx.array(read),
        mask=None if visible.all() else mx.array(visible[:, None, :, :]),
        blocks_needed=int(table.max()) + 1,
    )


class PagedKVPool:
    """Per-layer key/value arrays addressed by vLLM slot ids.

    The arrays grow on demand (doubling, up to the ``num_blocks`` vLLM granted) so a
    large KV budget costs memory only once the scheduler actually hands out its blocks.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: mx.Dtype, initial_blocks: int = 64) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.capacity = 0
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
        self.ensure_capacity(min(num_blocks, initial_blocks))

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.block_size * self.kv_heads * self.head_dim * self.dtype.size

    def ensure_capacity(self, blocks_needed: int) -> None:
        """Grow every layer's arrays so block ids ``< blocks_needed`` are addressable."""
        if blocks_needed <= self.capacity:
            return
        if blocks_needed > self.num_blocks:
            raise ValueError(f"block id {blocks_needed - 1} is outside the {self.num_blocks}"
                             " blocks vLLM allocated")
        new_cap = min(self.num_blocks, max(blocks_needed, 2 * self.capacity))
        old_slots, new_slots = self.capacity * self.block_size, new_cap * self.block_size

        def grown(a: mx.array | None) -> mx.array:  # head-major: each head's slots grow
            grow = mx.zeros((self.kv_heads, new_slots - old_slots, self.head_dim), self.dtype)
            if a is not None:
                grow = mx.concatenate([a.reshape(self.kv_heads, old_slots, -1), grow], axis=1)
            return grow.reshape(-1, self.head_dim)

        self.keys = [grown(k) for k in self.keys or [None] * self.num_layers]
        self.values = [grown(v) for v in self.values or [None] * self.num_layers]
        mx.eval(self.keys, self.values)
        self.capacity = new_cap

    def layer_caches(self, layout: BatchLayout) -> list["PagedLayerCache"]:
        write, read = self.indices(layout)
        return [PagedLayerCache(self, i, layout, write, read) for i in range(self.num_layers)]

    def indices(self, layout: BatchLayout) -> tuple[mx.array, mx.array]:
        """Flat indices into a layer's [kv_heads * num_slots, head_dim] arrays, shared by
        all layers of a forward: where the new keys go ([B, H, L] flattened, the order of
        a [B, H, L, D] key array's rows, so no transpose) and every context position
        ([B, H, C])."""
        self.ensure_capacity(layout.blocks_needed)
        slots = self.capacity * self.block_size
        head_base = mx.arange(self.kv_heads, dtype=mx.int32) * slots
        rows = layout.read_slots.shape[0]
        length = layout.write_slots.shape[0] // rows
        write = (head_base[None, :, None]
                 + layout.write_slots.reshape(rows, 1, length)).reshape(-1)
        read = head_base[None, :, None] + layout.read_slots[:, None, :]
        return write, read

    def write(self, layer: int, write_index: mx.array, keys: mx.array,
              values: mx.array) -> tuple[mx.array, mx.array]:
        """Store a forward's new keys/values ([B, H, L, D]); return the layer's arrays."""
        b, h, l, d = keys.shape
        for store, new in ((self.keys, keys), (self.values, values)):
            flat = store[layer]
            new = new if new.dtype == flat.dtype else new.astype(flat.dtype)
            flat[write_index] = new.reshape(b * h * l, d)
        return self.keys[layer], self.values[layer]

    def arrays(self) -> list[mx.array]:
        return self.keys + self.values


class PagedLayerCache:
    """The cache object one mlx-lm attention layer sees for one forward pass."""

    def __init__(self, pool: PagedKVPool, layer: int, layout: BatchLayout,
                 write_index: mx.array, read_index: mx.array) -> None:
        self.pool = pool
        self.layer = layer
        self.layout = layout
        self.write_index = write_index
        self.read_index = read_index
        self.offset = layout.offsets  # per-row rope offsets (mx.fast.rope accepts an array)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store this step's keys/values ([B, H, L, D]) and return each row's full context."""
        stored = self.pool.write(self.layer, self.write_index, keys, values)
        out = [flat[self.read_index] for flat in stored]  # [B, H, C, D], contiguous
        return tuple(c if c.dtype == keys.dtype else c.astype(keys.dtype) for c in out)

    def make_mask(self, n: int, return_array: bool = False,
                  window_size: int | None = None) -> mx.array | None:
        if window_size:  # model_loader rejects sliding-window models before we get here
            raise NotImplementedError("sliding-window attention is not supported")
        mask = self.layout.mask
        rows = self.layout.read_slots.shape[0]
        if rows == 1 and n > 1 and not return_array:
            return "causal"  # one row's chunk: MLX aligns it to the keys' end, as here
        if mask is None and return_array:  # the caller combines masks: spell "all visible"
            rows, ctx = self.layout.read_slots.shape
            mask = mx.ones((rows, 1, n, ctx), dtype=mx.bool_)
        return mask

    def is_trimmable(self) -> bool:  # part of mlx-lm's cache protocol; never trimmed here
        return False
