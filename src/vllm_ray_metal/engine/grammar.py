"""vLLM's structured-output bitmask applied to the step's logits, in MLX.

The scheduler compiles each constrained request's grammar (xgrammar, guidance or
outlines: the mask is backend-neutral) and sends one row of int32 words per request,
bit ``t % 32`` of word ``t // 32`` set when token ``t`` is allowed. Unpacking happens on
the device in one op for the whole step, so a constrained row costs no host sync.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

_BITS = mx.arange(32, dtype=mx.int32)


def step_bitmask(grammar_output, row_req_ids: list[str],
                 num_drafts: dict[str, int] | None = None) -> np.ndarray | None:
    """The bitmask reordered to the step's sampled rows (-1, all allowed, elsewhere).

    ``grammar_output.grammar_bitmask`` holds rows in the order of
    ``structured_output_request_ids``; a request not sampled this step is skipped. With
    speculative decoding a request has ``1 + num_drafts[req_id]`` consecutive rows, one
    per draft position and the bonus one, in the bitmask and in the step's logits alike.
    """
    if grammar_output is None or not row_req_ids:
        return None
    num_drafts = num_drafts or {}
    words = np.asarray(grammar_output.grammar_bitmask, dtype=np.int32)
    position, total = {}, 0  # each sampled request's first logits row
    for req_id in row_req_ids:
        position[req_id] = total
        total += 1 + num_drafts.get(req_id, 0)
    mask = np.full((total, words.shape[1]), -1, dtype=np.int32)
    hit, first = False, 0
    for req_id in grammar_output.structured_output_request_ids:
        n = 1 + num_drafts.get(req_id, 0)
        row = position.get(req_id)
        if row is not None:
            mask[row:row + n] = words[first:first + n]
            hit = True
        first += n
    return mask if hit else None


def apply(logits: mx.array, mask: np.ndarray) -> mx.array:
    """``logits`` [R, V] with every token the mask forbids set to -inf.

    Tokens past the mask's last word (logits wider than the vocabulary vLLM sized the
    mask for) are forbidden to constrained rows, which no grammar lets produce them, and
    left alone in unconstrained rows (all words -1), which must sample as if alone.
    """
    vocab = logits.shape[-1]
    allowed = (mx.array(mask)[:, :, None] >> _BITS) & 1  # [R, W, 32]
    allowed = allowed.reshape(mask.shape[0], -1).astype(mx.bool_)
    bits = allowed.shape[1]
    if bits >= vocab:
        allowed = allowed[:, :vocab]
    else:
        free = mx.array((mask == -1).all(axis=1))[:, None]  # [R, 1]
        pad = mx.broadcast_to(free, (mask.shape[0], vocab - bits))
        allowed = mx.concatenate([allowed, pad], axis=1)
    return mx.where(allowed, logits, mx.array(-float("inf"), dtype=logits.dtype))
