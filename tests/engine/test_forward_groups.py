"""The order of a step's forward passes: every block is written before a row reads it."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_forward_groups_write_blocks_before_reading_them():
    """Forwards run in an order where no row reads a block a later forward writes."""
    from vllm_ray_metal.engine.model_runner import MLXModelRunner
    from vllm_ray_metal.engine.requests import RequestState, Row

    runner = object.__new__(MLXModelRunner)
    runner.block_size = 4

    def row(index: int, blocks: list[int], start: int, count: int) -> Row:
        state = RequestState(f"r{index}", [0] * 16, None, blocks, start, None)
        return Row(state, start, count, index)

    def ids(rows: list[Row]) -> list[list[int]]:
        return [[r.index for r in g] for g in runner._forward_groups(rows)]

    decode, prefill = row(0, [1, 2], 5, 1), row(1, [3, 4], 0, 6)
    # prompt chunks of near-equal length share a forward, longest first
    assert ids([decode, prefill, row(2, [5], 0, 3)]) == [[0], [1, 2]]
    assert ids([row(0, [5], 0, 3), row(1, [6, 7, 8, 9, 10], 0, 20), row(2, [3, 4], 0, 6)]) \
        == [[2, 0], [1]]  # groups keep the scheduler's order of their first rows
    # a longer prompt that hits block 3, which a shorter one fills in this step: the
    # writer's forward still comes first, and the reverse order falls back to one forward
    writer, reader = row(0, [3, 4], 0, 8), row(1, [3, 5, 6, 7, 8, 9], 4, 20)
    assert ids([writer, reader]) == [[0], [1]]
    assert ids([row(0, [3, 5, 6, 7, 8, 9], 4, 20), row(1, [3, 4], 0, 8)]) == [[0, 1]]
    # a one-token row hits block 3, which the prefill fills in this step: it runs last
    assert ids([decode, prefill, row(2, [3, 6], 4, 1), row(3, [7], 2, 1)]) == \
        [[0, 3], [1], [2]]
    # a prefill hits block 2, whose last slot a one-token row fills: already in order
    assert ids([row(0, [1, 2], 7, 1), row(1, [1, 2, 7], 8, 2)]) == [[0], [1]]
    # conflicts vLLM does not produce with block_size > 1 (a prefill reading the block a
    # late one-token row writes; two rows writing one block) fall back to one forward
    late_writer = [prefill, row(2, [3, 9], 4, 1), row(3, [3, 9, 10], 8, 3)]
    assert ids(late_writer) == [[1, 2, 3]]
    assert ids([row(0, [3, 4], 0, 8), row(1, [3, 4], 7, 1)]) == [[0, 1]]
