"""Speculative decoding: n-gram proposals (prompt lookup) for the next step, and when
any proposer (this one, or the draft model of ``draft.py``) should propose at all.

The scheduler sends each speculating request's proposals back as extra tokens of its
row (``scheduled_spec_decode_tokens``); the runner runs them in the step's forward and
the sampler keeps the prefix vLLM's rules accept (``sampler.verify``). What is proposed
never changes what is generated, only how many tokens one forward yields.
"""

from __future__ import annotations

import time

import numpy as np

from vllm_ray_metal.engine import draft

METHODS = ("ngram", "draft_model")  # what the runner proposes with (config.py refuses others)

MAX_VERIFY_ROWS = 32
# Token rows a decode forward may have, drafts and their padding included (the forward
# is a rectangle: every row as wide as the most drafts): the more requests decode, the
# fewer drafts each may get, one at 16, none from 17 on. Within it, DraftPolicy decides
# from measurements whether drafts are offered at all.


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

    def lag(self, states: list) -> int:
        return 0  # nothing to catch up: the lookup reads the request's tokens


class DraftPolicy:
    """Whether a decode step should carry drafts, decided by measurement on this device.

    A decode forward is a rectangle, so drafts widen every row of it; they pay when the
    extra tokens they win outgrow the extra time the wider step takes. On a GPU extra
    rows cost little until it is compute-bound, on a CPU nearly their share, so neither
    is assumed: the runner times decode steps with and without drafts (the draft
    model's proposing included) per number of decoding requests, and each request keeps
    a running mean of the tokens its drafts won. Drafts are offered while
    ``(n + expected extra tokens) / time with drafts`` beats ``n / time without``; the
    other choice is still tried now and then, as contexts grow and costs move, the more
    seldom the more a step of it costs (a draft model's step can cost many plain ones, so
    its trials would otherwise eat what plain decoding saves), and drafts are not tried
    while a draft model lags far behind these requests (trying them would first run it
    over every token it missed). The first step of each kind is not counted: a new
    forward shape pays for its first run (compiled functions are traced per shape), not
    for what the shape costs afterwards.
    """

    SMOOTH = 0.3  # weight of the newest measurement in every running mean
    PROBE_EVERY = 16  # the other choice once every so many decisions for one batch size,
    # times how many of the chosen steps a step of it costs

    def __init__(self, mode: str = "measure") -> None:
        if mode not in ("measure", "always"):
            raise ValueError(f"VLLM_RAY_METAL_SPEC_DRAFTS={mode!r}: use measure or always")
        self.always = mode == "always"
        self.cost: dict[tuple[int, int], float] = {}  # (requests, drafts offered) -> s
        self.warmed: set[tuple[int, int]] = set()  # kinds of step that ran once already
        self.since_probe: dict[int, int] = {}  # decisions since the other choice was tried
        self.prior = 1.0  # tokens a request's drafts are expected to win, before its own
        self.offered = 0  # drafts offered at the last proposal (0: none)
        self.offered_to: set[str] = set()  # the requests they were offered to
        self.proposing_s = 0.0  # what proposing them took

    def offer(self, states: list, k: int, lag: int = 0) -> bool:
        """Offer ``k`` drafts to each of these decoding requests for the next step?
        ``lag``: the most tokens the proposer must catch up on for one of them."""
        if self.always:
            return True
        n = len(states)
        plain, drafted = self.cost.get((n, 0)), self.cost.get((n, k))
        if plain is None or drafted is None:
            return plain is not None  # measure both choices, plain decoding first
        gain = sum(self.prior if s.spec_gain is None else s.spec_gain for s in states)
        better = (n + gain) / drafted > n / plain
        chosen, other = (drafted, plain) if better else (plain, drafted)
        count = self.since_probe[n] = self.since_probe.get(n, 0) + 1
        if count < self.PROBE_EVERY * max(1.0, other / chosen) or \
                (not better and lag > draft.CATCH_UP_BATCHED):
            return better
        self.since_probe[n] = 0
        return not better

    def measure(self, step, sampled: list[list[int]]) -> None:
        """What the runner's step (``requests.Step``) just took, if every row decoded, and
        what the drafts offered to its requests won (``sampled``: tokens per row)."""
        if step.decoding and step.to_sample:
            self.record_step(step.num_rows, time.perf_counter() - step.started)
        for r in step.to_sample:
            if r.state.req_id in self.offered_to:
                self.record_gain(r.state, len(sampled[r.index]) - 1)

    def record_step(self, requests: int, seconds: float) -> None:
        """A decode step of ``requests`` rows ran (each offered ``self.offered`` drafts at
        the last proposal, which took ``proposing_s``)."""
        key = (requests, self.offered)
        if key not in self.warmed:
            self.warmed.add(key)
            return
        total = seconds + self.proposing_s
        old = self.cost.get(key)
        self.cost[key] = total if old is None else old + self.SMOOTH * (total - old)

    def record_gain(self, state, accepted: int) -> None:
        """The request was offered drafts and won ``accepted`` tokens from them."""
        old = self.prior if state.spec_gain is None else state.spec_gain
        state.spec_gain = old + self.SMOOTH * (accepted - old)
        self.prior += self.SMOOTH * (accepted - self.prior)


def next_drafts(proposer, states: list, k: int, budget: int = MAX_VERIFY_ROWS,
                policy: DraftPolicy | None = None) -> list[list[int]]:
    """Proposals for the requests (the runner's states) that just sampled: at most ``k``
    each (vLLM's dynamic schedule may lower it), within the row budget, and none when
    ``policy`` measured that drafts would not pay. ``proposer``: an
    :class:`NgramProposer` or a ``draft.DraftModel`` (``propose_all(states, k)``)."""
    k = min(k, budget // max(len(states), 1) - 1)
    if k < 1 or (policy is not None and not policy.offer(states, k, proposer.lag(states))):
        if policy is not None:
            policy.offered, policy.offered_to, policy.proposing_s = 0, set(), 0.0
        return [[] for _ in states]
    start = time.perf_counter()
    drafts = proposer.propose_all(states, k)
    if policy is not None:
        policy.offered, policy.proposing_s = k, time.perf_counter() - start
        policy.offered_to = {s.req_id for s in states}
    return drafts


def proposer_for(vllm_config, dtype) -> NgramProposer | draft.DraftModel | None:
    """The proposer ``speculative_config`` asks for (None without one)."""
    spec, model = vllm_config.speculative_config, vllm_config.model_config
    if spec is None:
        return None
    if spec.method == "draft_model":
        return draft.DraftModel(spec.draft_model_config,
                                str(model.dtype).removeprefix("torch."), dtype,
                                vllm_config.cache_config.block_size, model.max_model_len)
    return NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min,
                         spec.prompt_lookup_max, model.max_model_len)
