"""How a step's rows become forward passes: which rows share one, in what order, and how
a long prompt chunk is cut into pieces.

A row is anything with ``start``, ``count``, ``index`` and ``state.block_ids`` (the
runner's ``requests.Row``): ``count`` new tokens from position ``start``, ``index`` its place
in the scheduler's order.
"""

from __future__ import annotations

from dataclasses import replace

MAX_PREFILL_PADDING = 8
# Prompt chunks whose lengths differ by at most this many tokens share one forward: a
# forward reads every weight once, and a few tokens of padding per row cost less than
# another pass over the weights (e.g. sixteen 10-token chunks, a prefix-cache hit's
# remainder, in one forward instead of sixteen).

PREFILL_PIECE = 512
# A longer prompt chunk runs as successive forwards of this many tokens: each piece
# attends only to the positions before its end, so causal attention computes about half
# the scores a whole-chunk square would (the masked half is computed, then discarded),
# and a piece's scores stay small. A piece is still wide enough to keep the weight
# products efficient.


def prefill_groups(rows: list) -> list[list]:
    """Rows of several tokens in groups of near-equal length, in the scheduler's order.

    Groups are formed longest first, then ordered by their earliest row: vLLM admits a
    request that hits a block another admits in the same step after its writer.
    """
    groups: list[list] = []
    for r in sorted(rows, key=lambda r: -r.count):
        if groups and groups[-1][0].count - r.count <= MAX_PREFILL_PADDING:
            groups[-1].append(r)
        else:
            groups.append([r])
    return sorted(groups, key=lambda g: min(r.index for r in g))


def forward_groups(rows: list, block_size: int) -> list[list]:
    """Order a step's rows into forward passes so that every block is written first.

    One-token rows (and decoding rows with drafts) share a forward; longer rows share
    one when their lengths differ by at most :data:`MAX_PREFILL_PADDING` tokens (see
    :func:`prefill_groups`). vLLM
    registers a prefix-cache block when it schedules the tokens that fill it, so a
    request admitted later in the same step can hit a block only written in this step
    (the writer is an earlier row). A one-token row that reads a block a longer row
    writes (a copy of an ``n * block_size + 1``-token prompt admitted with it)
    therefore runs in a second one-token forward after the longer rows. Any other
    order conflict puts all rows in one forward, where every layer writes all rows'
    keys before any row reads.
    """
    decodes = [r for r in rows if _decoding(r)]
    prefills = prefill_groups([r for r in rows if not _decoding(r)])
    if not prefills:
        return [decodes] if decodes else []
    written = {b for group in prefills for r in group for b in blocks(r, block_size)[1]}
    early, late = [], []
    for r in decodes:
        (early if written.isdisjoint(blocks(r, block_size)[0]) else late).append(r)
    groups = [g for g in (early, *prefills, late) if g]
    return groups if writes_precede_reads(groups, block_size) else [rows]


def _drafts(row) -> int:
    return len(getattr(row, "drafts", ()))  # speculative proposals at the row's end


def _decoding(row) -> bool:
    """One new known token (and any drafts after it)."""
    return row.count - _drafts(row) == 1


def writes_precede_reads(groups: list[list], block_size: int) -> bool:
    """True if no forward reads (or also writes) a block that a later forward writes."""
    later: set[int] = set()  # blocks written by the groups after the current one
    for group in reversed(groups):
        spans = [blocks(r, block_size) for r in group]
        if any(not later.isdisjoint(reads) for reads, _ in spans):
            return False
        for _, writes in spans:
            later.update(writes)
    return True


def blocks(row, block_size: int) -> tuple[list[int], list[int]]:
    """(blocks the row reads, including its own new tokens; blocks it writes)."""
    first, end = row.start // block_size, (row.start + row.count - 1) // block_size + 1
    return row.state.block_ids[:end], row.state.block_ids[first:end]


def pieces(group: list, block_size: int, piece: int = PREFILL_PIECE) -> list[list]:
    """The group as successive forwards of at most ``piece`` tokens a row (one forward
    if it is short, or if a row reads a block another row of the group writes: that
    forward must write every row's keys before any row reads)."""
    longest = max(r.count for r in group)
    if longest <= piece or any(_drafts(r) for r in group):  # (drafts end a row: whole)
        return [group]
    spans = [blocks(r, block_size) for r in group]
    for i, (reads, _) in enumerate(spans):
        if any(not set(reads).isdisjoint(w) for j, (_, w) in enumerate(spans) if j != i):
            return [group]
    out = []
    for offset in range(0, longest, piece):
        # a row that ran out of tokens sits at its end with none (no positions to fill)
        out.append([replace(r, start=r.start + min(offset, r.count),
                            count=max(0, min(piece, r.count - offset))) for r in group])
    return out
