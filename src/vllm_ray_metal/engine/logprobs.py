"""Logprobs in the layouts vLLM's scheduler reads: prompt logprobs filled chunk by chunk,
sampled logprobs in the step's request order (a row per generated token when
speculative decoding returns several)."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np
import torch

from vllm_ray_metal.compat import vllm as compat_vllm
from vllm_ray_metal.engine import sampler


def prompt_chunk(state, start: int, count: int, hidden: mx.array,
                 logits_of: Callable[[mx.array], mx.array], out: dict) -> None:
    """vLLM's chunked prompt-logprob protocol: fill the chunk's rows of ``state``'s
    prompt logprobs (``count`` known tokens from ``start``), and put them in ``out``
    once the prompt is complete."""
    prompt_len = len(state.prompt_token_ids)
    if start >= prompt_len:
        return
    remaining = prompt_len - (start + 1)
    num_logits = min(count, remaining)
    k = state.num_prompt_logprobs
    if state.prompt_logprobs is None:
        state.prompt_logprobs = (np.zeros((prompt_len - 1, k + 1), np.int32),
                                 np.zeros((prompt_len - 1, k + 1), np.float32),
                                 np.zeros(prompt_len - 1, np.int32))
    if num_logits > 0:
        logits = logits_of(hidden[:num_logits])
        lps = sampler.log_softmax(np.asarray(logits.astype(mx.float32)))
        targets = np.asarray(state.prompt_token_ids[start + 1:start + 1 + num_logits], np.int64)
        ids, vals, ranks = sampler.gather_logprobs(lps, k, targets)
        chunk = slice(start, start + num_logits)
        state.prompt_logprobs[0][chunk] = ids
        state.prompt_logprobs[1][chunk] = vals
        state.prompt_logprobs[2][chunk] = ranks
    if count > remaining:  # this chunk finishes the prompt
        ids, vals, ranks = state.prompt_logprobs
        out[state.req_id] = compat_vllm.logprobs_tensors(
            torch.from_numpy(ids), torch.from_numpy(vals), torch.from_numpy(ranks))
        state.prompt_logprobs = None
        state.num_prompt_logprobs = None


def in_request_order(lp: tuple[np.ndarray, np.ndarray, np.ndarray], indices: list[int],
                     counts: list[int], num_rows: int):
    """Sampled logprobs (rows of the sampled requests' tokens, in sampling order) laid out
    by the step's request order: one row per request, or with speculative decoding one
    per generated token, found through vLLM's cumulative offsets."""
    ids, vals, ranks = lp
    if all(n == 1 for n in counts):
        per_token = np.asarray(indices, np.int64)
        total, cu = num_rows, None
    else:
        per_request = np.zeros(num_rows, np.int64)
        per_request[indices] = counts
        offsets = np.concatenate([[0], np.cumsum(per_request)])
        per_token = np.concatenate([np.arange(offsets[i], offsets[i] + n)
                                    for i, n in zip(indices, counts)])
        total, cu = int(offsets[-1]), offsets.tolist()
    full_ids = np.zeros((total, ids.shape[1]), np.int32)
    full_vals = np.zeros((total, ids.shape[1]), np.float32)
    full_ranks = np.zeros(total, np.int32)
    full_ids[per_token], full_vals[per_token], full_ranks[per_token] = ids, vals, ranks
    return compat_vllm.logprobs_lists(full_ids, full_vals, full_ranks, cu)
