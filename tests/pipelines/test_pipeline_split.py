"""How a job's users are cut into actor calls: ranges of rows of the ingested blocks."""
from __future__ import annotations

import pytest

from prefixfleet.pipelines.training.fleet import chunks


def _rows(blocks: list[tuple[str, int]], actors: int, pack: int, isolated: bool = False) -> list[list[tuple[str, int]]]:
    users = sum(rows for _, rows in blocks)
    return [[(c.block, row) for row in range(c.start, c.stop)] for c in chunks(blocks, users, actors, pack, isolated)]


@pytest.mark.parametrize("users,actors,pack", [(1000, 2, 8), (50, 2, 8), (6, 2, 8), (8, 1, 2), (1, 4, 8), (0, 2, 8)])
def test_packed_chunks_cover_every_user_in_order_and_shrink_towards_the_end(users: int, actors: int, pack: int) -> None:
    calls = _rows([("b", users)], actors, pack)
    assert [row for call in calls for _, row in call] == list(range(users))
    sizes = [len(c) for c in calls]
    assert all(0 < s <= 4 * pack for s in sizes)
    assert sizes == sorted(sizes, reverse=True)
    assert not sizes or sizes[-1] <= pack
    assert len(calls) >= min(users, actors)


def test_a_chunk_never_spans_two_blocks_and_every_row_is_sent_once() -> None:
    blocks = [("a", 7), ("b", 0), ("c", 40), ("d", 1)]
    calls = _rows(blocks, 2, 8)
    assert all(len({block for block, _ in call}) == 1 for call in calls)
    assert [pair for call in calls for pair in call] == [(b, r) for b, n in blocks for r in range(n)]


def test_isolated_is_one_user_per_call() -> None:
    assert _rows([("a", 2), ("b", 1)], 2, 8, isolated=True) == [[("a", 0)], [("a", 1)], [("b", 0)]]
