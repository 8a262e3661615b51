"""Token sampling and logprobs with vLLM's semantics, on the host.

Order follows vLLM's V1 sampler: logits processors (penalties, logit bias, min_tokens,
allowed/bad words) -> greedy argmax, or temperature -> min_p -> top_k -> top_p -> draw.
Returned logprobs are vLLM's default ``raw_logprobs``: the log-softmax of the model's
logits before any processing. A request with a seed owns its random generator, so its
draws do not depend on what else is in the batch.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import numpy as np

SAMPLING_EPS = 1e-5  # vLLM treats temperature below this as greedy


class SamplingRow(Protocol):
    """What the sampler needs to know about one request (the runner's request state)."""

    sampling_params: object
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: np.random.Generator | None


def _needs_processing(params) -> bool:
    return bool(
        params.presence_penalty or params.frequency_penalty
        or params.repetition_penalty != 1.0 or params.logit_bias
        or params.allowed_token_ids or params.bad_words_token_ids
        or params.min_tokens)


def _is_greedy(params) -> bool:
    return params.temperature < SAMPLING_EPS


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def gather_logprobs(logprobs: np.ndarray, num_logprobs: int, token_ids: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vLLM's layout: column 0 is the chosen token, then the top ``num_logprobs``.

    Rank is the number of tokens whose logprob is >= the chosen token's (1 = best).
    """
    rows = np.arange(len(token_ids))
    chosen = logprobs[rows, token_ids]
    ranks = (logprobs >= chosen[:, None]).sum(axis=-1)
    if num_logprobs > 0:
        top = np.argpartition(-logprobs, num_logprobs - 1, axis=-1)[:, :num_logprobs]
        order = np.argsort(-np.take_along_axis(logprobs, top, axis=-1), axis=-1, kind="stable")
        top = np.take_along_axis(top, order, axis=-1)
    else:
        top = np.zeros((len(token_ids), 0), dtype=np.int64)
    ids = np.concatenate([token_ids[:, None], top], axis=1).astype(np.int32)
    lps = np.concatenate([chosen[:, None], np.take_along_axis(logprobs, top, axis=-1)],
                         axis=1).astype(np.float32)
    return ids, lps, ranks.astype(np.int32)


def _apply_processors(x: np.ndarray, params, row: SamplingRow) -> np.ndarray:
    output = row.output_token_ids
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(row.prompt_token_ids + output, dtype=np.int64))
        vals = x[seen]
        x[seen] = np.where(vals > 0, vals / params.repetition_penalty,
                           vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output:
        ids, counts = np.unique(np.asarray(output, dtype=np.int64), return_counts=True)
        x[ids] -= params.frequency_penalty * counts + params.presence_penalty
    if params.logit_bias:
        for tok, bias in params.logit_bias.items():
            x[int(tok)] += bias
    if params.allowed_token_ids:
        keep = np.full(x.shape, -np.inf, dtype=x.dtype)
        idx = np.asarray(params.allowed_token_ids, dtype=np.int64)
        keep[idx] = x[idx]
        x = keep
    if params.bad_words_token_ids:
        history = row.prompt_token_ids + output
        for word in params.bad_words_token_ids:
            prefix = word[:-1]
            if not prefix or history[len(history) - len(prefix):] == prefix:
                x[word[-1]] = -np.inf
    if params.min_tokens and len(output) < params.min_tokens:
        stops = list(getattr(params, "all_stop_token_ids", None) or params.stop_token_ids or [])
        if stops:
            x[np.asarray(stops, dtype=np.int64)] = -np.inf
    return x


def _probs(x: np.ndarray, params) -> np.ndarray:
    """The (unnormalised) distribution a random row draws from."""
    x = x / params.temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if params.min_p > 0.0:
        probs = np.where(probs < params.min_p * probs.max(), 0.0, probs)
    if 0 < params.top_k < probs.size:
        kth = np.partition(probs, -params.top_k)[-params.top_k]
        probs = np.where(probs < kth, 0.0, probs)
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order] / probs.sum()
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cut = int(np.searchsorted(np.cumsum(sorted_p), params.top_p)) + 1
        trimmed = np.zeros_like(probs)
        trimmed[order[:cut]] = probs[order[:cut]]
        probs = trimmed
    return probs


def _pick(probs: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(probs, dtype=np.float64)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), probs.size - 1))


def _draw(x: np.ndarray, params, rng: np.random.Generator) -> int:
    return _pick(_probs(x, params), rng)


def sample(logits: mx.array, rows: list[SamplingRow], default_rng: np.random.Generator
           ) -> tuple[list[int], tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """Pick one token per row of ``logits`` ([R, V]).

    Returns the tokens and, if any row asked for logprobs, ``(ids, logprobs, ranks)``
    arrays with one row per input row (rows that did not ask are zero-filled).
    """
    params = [r.sampling_params for r in rows]
    want_logprobs = [p.logprobs for p in params]
    simple = all(_is_greedy(p) and not _needs_processing(p) for p in params)
    if simple and all(k is None for k in want_logprobs):
        return np.asarray(mx.argmax(logits, axis=-1)).astype(np.int64).tolist(), None

    raw = np.asarray(logits.astype(mx.float32))
    tokens: list[int] = []
    for i, (p, row) in enumerate(zip(params, rows)):
        x = raw[i]
        if _needs_processing(p):
            x = _apply_processors(x.copy(), p, row)
        if _is_greedy(p):
            tokens.append(int(np.argmax(x)))
        else:
            tokens.append(_draw(x.astype(np.float64), p, row.generator or default_rng))
    if all(k is None for k in want_logprobs):
        return tokens, None

    vocab = raw.shape[1]
    width = max(vocab if k == -1 else k for k in want_logprobs if k is not None)
    logprobs = log_softmax(raw)
    ids, lps, ranks = gather_logprobs(logprobs, width, np.asarray(tokens, dtype=np.int64))
    for i, k in enumerate(want_logprobs):
        if k is None:
            ids[i], lps[i], ranks[i] = 0, 0.0, 0
    return tokens, (ids, lps, ranks)


class _Drafted:
    """A request's state as seen at a draft position: its output so far plus the drafts
    accepted before that position (penalties and min_tokens count them)."""

    def __init__(self, row: SamplingRow, accepted: list[int]) -> None:
        self.sampling_params = row.sampling_params
        self.prompt_token_ids = row.prompt_token_ids
        self.output_token_ids = row.output_token_ids + accepted
        self.generator = row.generator


def verify(logits: mx.array, rows: list[SamplingRow], drafts: list[list[int]],
           default_rng: np.random.Generator
           ) -> tuple[list[list[int]], tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """Accept a prefix of each row's drafts and add one token, as vLLM's rejection
    sampler does.

    ``logits`` holds ``len(d) + 1`` consecutive rows per request: the target at each draft
    position, then the bonus position. Greedy: drafts are kept while they equal the
    argmax, then the argmax is added. Random: a draft ``d`` is kept with probability
    ``p(d)`` (the proposal is deterministic, so ``min(1, p/q) = p``); at the first
    rejection a token is drawn from ``p`` without ``d`` (the residual ``max(p - q, 0)``),
    and if every draft is kept the bonus position is drawn as usual. Each output token
    is thus distributed as non-speculative sampling's. A draft of -1 (the scheduler's
    placeholder) is always rejected.

    Returns the tokens per request and, if any asked for logprobs, ``(ids, logprobs,
    ranks)`` with one row per returned token (in order), from its position's logits.
    """
    params = [r.sampling_params for r in rows]
    want_logprobs = [p.logprobs for p in params]
    simple = all(_is_greedy(p) and not _needs_processing(p) for p in params)
    targets = None
    if simple:
        targets = np.asarray(mx.argmax(logits, axis=-1)).astype(np.int64)
    else:
        mx.eval(logits)  # then each position read is converted alone (not those after a
        # request's first rejection)
    out: list[list[int]] = []
    positions: list[int] = []  # the logits row of every returned token
    offset = 0
    for p, row, proposed in zip(params, rows, drafts):
        rng = row.generator or default_rng
        tokens: list[int] = []
        for j in range(len(proposed) + 1):
            draft = proposed[j] if j < len(proposed) else None
            if simple:
                tok = int(targets[offset + j])
            else:
                x = np.asarray(logits[offset + j].astype(mx.float32))
                if _needs_processing(p):
                    x = _apply_processors(x.copy(), p, _Drafted(row, tokens))
                if _is_greedy(p):
                    tok = int(np.argmax(x))
                else:
                    probs = _probs(x.astype(np.float64), p)
                    if draft is not None and draft >= 0 and \
                            rng.random() * probs.sum() < probs[draft]:
                        tok = draft
                    else:
                        if draft is not None and draft >= 0:
                            probs[draft] = 0.0
                        tok = _pick(probs, rng)
            tokens.append(tok)
            positions.append(offset + j)
            if tok != draft:
                break
        out.append(tokens)
        offset += len(proposed) + 1
    if all(k is None for k in want_logprobs):
        return out, None
    raw = np.asarray(logits[mx.array(positions)].astype(mx.float32))
    width = max(raw.shape[1] if k == -1 else k for k in want_logprobs if k is not None)
    chosen = np.asarray([t for tokens in out for t in tokens], dtype=np.int64)
    ids, lps, ranks = gather_logprobs(log_softmax(raw), width, chosen)
    first = 0
    for k, tokens in zip(want_logprobs, out):
        if k is None:
            ids[first:first + len(tokens)], lps[first:first + len(tokens)] = 0, 0.0
            ranks[first:first + len(tokens)] = 0
        first += len(tokens)
    return out, (ids, lps, ranks)
