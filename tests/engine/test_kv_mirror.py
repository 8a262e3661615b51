"""The KV mirror against mlx-lm's own contiguous KVCache, on the real model: slots kept
across steps, dummy slots, positions copied from the pool, reassignment and growth."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from vllm_ray_metal.engine import kv_mirror, model_loader, step_plan
from vllm_ray_metal.engine.kv_cache import build_layout
from vllm_ray_metal.engine.kv_mirror import KVMirror

from test_kv_cache import BLOCK, make_pool, model, reference_logits  # noqa: F401

pytestmark = pytest.mark.unit


class Seq:
    """One request: its tokens, its block table, how far it is computed."""

    def __init__(self, req_id: str, tokens: list[int], blocks: list[int]) -> None:
        self.req_id, self.tokens, self.blocks, self.done = req_id, tokens, blocks, 0


def step(model, mirror, groups: list[list[tuple[Seq, int]]]) -> dict[str, np.ndarray]:
    """One scheduler step: forwards of (sequence, new tokens); logits by request."""
    placed = mirror.place([[(s.req_id, s.done + n) for s, n in g] for g in groups])
    assert placed is not None
    out = {}
    for group, slots in zip(groups, placed):
        lo = min(slots)
        rows: list = [None] * (max(slots) - lo + 1)
        for (s, n), slot in zip(group, slots):
            rows[slot - lo] = (s, n)
        width = max(n for _, n in group)
        tokens = np.zeros((len(rows), width), np.int32)
        for b, r in enumerate(rows):
            if r:
                tokens[b, :r[1]] = r[0].tokens[r[0].done:r[0].done + r[1]]
        layout = build_layout([r[0].done if r else 0 for r in rows],
                              [r[1] if r else 0 for r in rows],
                              [r[0].blocks if r else [] for r in rows], BLOCK)
        caches = mirror.layer_caches(layout, lo, [
            (r[0].req_id, r[0].done, r[1], r[0].blocks) if r else None for r in rows])
        h = model.model(mx.array(tokens), cache=caches)
        logits = np.asarray(model_loader.compute_logits(model, h))
        for b, r in enumerate(rows):
            if r:
                out[r[0].req_id] = logits[b, :r[1]]
                r[0].done += r[1]
    return out


def check(out: dict, model, seqs: dict[str, Seq]) -> None:
    for req_id, got in out.items():
        s = seqs[req_id]
        ref = reference_logits(model, s.tokens[:s.done])[s.done - len(got):]
        np.testing.assert_allclose(got, ref, atol=3e-4, rtol=1e-4, err_msg=req_id)


@pytest.mark.core
def test_mirror_steps_match_contiguous_cache(model):
    rng = np.random.default_rng(5)
    seqs = {n: Seq(n, rng.integers(3, 40000, size=40).tolist(), blocks)
            for n, blocks in [("a", [3, 9, 4, 11, 20, 21, 22, 23, 24, 25]),
                              ("b", [5, 12, 30, 31, 32, 33, 34, 35, 36, 37]),
                              ("c", [6, 13, 40, 41, 42, 43, 44, 45, 46, 47])]}
    a, b, c = seqs["a"], seqs["b"], seqs["c"]
    mirror = KVMirror(make_pool(model, blocks=128), 1 << 30)
    check(step(model, mirror, [[(a, 9)], [(b, 5)]]), model, seqs)  # two prefills
    check(step(model, mirror, [[(a, 1), (b, 1)]]), model, seqs)  # decode, kept slots
    check(step(model, mirror, [[(a, 1), (b, 1)], [(c, 7)]]), model, seqs)  # c: a free slot
    mirror.forget("a")  # a finishes: its slot is a hole the next decode runs as a dummy
    check(step(model, mirror, [[(b, 1), (c, 1)]]), model, seqs)
    assert mirror.slots.count(None) >= 1
    # c is preempted and resumed on its old blocks after a prefix-cache hit: its slot is
    # refilled from the pool, then it continues
    mirror.forget("c")
    check(step(model, mirror, [[(b, 1)], [(c, 3)]]), model, seqs)
    # enough new requests to outgrow the slots: everyone is reassigned and refilled
    more = {f"n{i}": Seq(f"n{i}", rng.integers(3, 40000, size=12).tolist(), [50 + 3 * i,
                                                                            51 + 3 * i,
                                                                            52 + 3 * i])
            for i in range(5)}
    seqs.update(more)
    slots_before = mirror.num_slots
    check(step(model, mirror, [[(b, 1), (c, 1)], [(s, 6) for s in more.values()]]), model,
          seqs)
    assert mirror.num_slots > slots_before
    check(step(model, mirror, [[(s, 1) for s in [b, c, *more.values()]]]), model, seqs)


def test_capacity_grows_and_keeps_contents(model, monkeypatch):
    monkeypatch.setattr(kv_mirror, "CAPACITY_STEP", 8)
    rng = np.random.default_rng(6)
    s = Seq("a", rng.integers(3, 40000, size=30).tolist(), list(range(1, 9)))
    mirror = KVMirror(make_pool(model), 1 << 30)
    check(step(model, mirror, [[(s, 6)]]), model, {"a": s})
    assert mirror.capacity == 8
    for n in (5, 1, 9):  # every step grows it past the spare position
        check(step(model, mirror, [[(s, n)]]), model, {"a": s})
    assert mirror.capacity == 24


def test_a_step_over_budget_runs_on_the_pool(model):
    pool = make_pool(model)
    mirror = KVMirror(pool, max_positions=100)
    assert mirror.place([[("a", 50)]]) is None  # 4 slots x 256 positions > 100 positions
    assert mirror.nbytes == 0


@dataclass
class _State:
    block_ids: list[int]


@dataclass
class _R:
    state: _State
    start: int
    count: int
    index: int


def test_long_chunks_run_in_pieces_unless_rows_share_blocks():
    long = _R(_State(list(range(1, 80))), 0, 1200, 0)
    pieces = step_plan.pieces([long], BLOCK, piece=512)
    assert [(p[0].start, p[0].count) for p in pieces] == [(0, 512), (512, 512), (1024, 176)]
    assert step_plan.pieces([_R(_State([1]), 0, 3, 0)], BLOCK, piece=512)[0][0].count == 3
    # a row reading the blocks another row of the forward writes: one forward
    writer = _R(_State(list(range(1, 301))), 0, 1200, 0)
    reader = _R(_State(list(range(1, 301))), 600, 596, 1)
    assert len(step_plan.pieces([writer, reader], BLOCK, piece=512)) == 1
    # rows of near-equal length: the shorter one waits at its end in the last piece
    a, b = _R(_State(list(range(1, 200))), 0, 516, 0), _R(_State(list(range(200, 400))), 9, 511, 1)
    last = step_plan.pieces([a, b], BLOCK, piece=512)[-1]
    assert [(r.start, r.count) for r in last] == [(512, 4), (520, 0)]
