"""Speculative decoding: n-gram proposals (prompt lookup) for the next step, and the row
budget every proposer keeps to (the draft model is ``draft.py``).

The scheduler sends each speculating request's proposals back as extra tokens of its
row (``scheduled_spec_decode_tokens``); the runner runs them in the step's forward and
the sampler keeps the prefix vLLM's rules accept (``sampler.verify``). What is proposed
never changes what is generated, only how many tokens one forward yields.
"""

from __future__ import annotations

import numpy as np

METHODS = ("ngram", "draft_model")  # what the runner proposes with (config.py refuses others)

MAX_VERIFY_ROWS = 32
# Token rows a decode forward may have, drafts and their padding included (the forward
# is a rectangle: every row as wide as the most drafts). A forward reads each weight
# once, so a single stream verifies its drafts almost for free; a full batch pays for
# every extra row, and drafts that are mostly rejected would slow it down. So the more
# requests decode, the fewer drafts each gets: one at 16, none (plain decoding) from 17
# on (BENCHMARKS.md P6 measures both ends).


class NgramProposer:
    """Prompt lookup: find the longest suffix of the request's tokens (``min_n`` to
    ``max_n`` tokens) that occurred before, and propose the ``k`` tokens that followed
    an earlier occurrence of it."""

    def __init__(self, k: int, min_n: int, max_n: int, max_model_len: int) -> None:
        if not 1 <= min_n <= max_n or k < 1:
            raise ValueError(f"n-gram proposer needs 1 <= prompt_lookup_min ({min_n}) <= "
                             f"prompt_lookup_max ({max_n}) and num_speculative_tokens "
                             f"({k}) >= 1")
        self.k, self.min_n, self.max_n = k, min_n, max_n
        self.max_model_len = max_model_len

    def propose(self, tokens: np.ndarray, k: int | None = None) -> list[int]:
        """Up to ``k`` (default: the configured number) draft tokens to follow ``tokens``
        (1-D ints); [] if no match."""
        size = len(tokens)
        room = min(self.k if k is None else k, self.max_model_len - size)
        if room <= 0 or size <= self.min_n:
            return []
        # ends: positions before the last whose token equals the last; each step back
        # keeps those whose preceding token also matches, so ``ends`` holds the ends of
        # the earlier occurrences of the last ``n`` tokens
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])
        n = 1
        while ends.size and n < self.max_n:
            room_before = ends[ends >= n]
            longer = room_before[tokens[room_before - n] == tokens[size - 1 - n]]
            if not longer.size:
                break
            ends, n = longer, n + 1
        if not ends.size or n < self.min_n:
            return []
        # the latest occurrence with ``room`` tokens after it (in periodic text the
        # latest is one period back, too close to the end for a full draft), else the
        # earliest
        full = ends[ends + room < size]
        start = int(full[-1] if full.size else ends[0]) + 1
        return tokens[start:start + room].tolist()

    def propose_all(self, states: list, k: int) -> list[list[int]]:
        return [self.propose(s.token_array(), k) for s in states]


def next_drafts(proposer, states: list, k: int,
                budget: int = MAX_VERIFY_ROWS) -> list[list[int]]:
    """Proposals for the requests (the runner's states) that just sampled: at most ``k``
    each (vLLM's dynamic schedule may lower it), and within the row budget. ``proposer``:
    an :class:`NgramProposer` or a ``draft.DraftModel`` (``propose_all(states, k)``)."""
    k = min(k, budget // max(len(states), 1) - 1)
    if k < 1:
        return [[] for _ in states]
    return proposer.propose_all(states, k)
