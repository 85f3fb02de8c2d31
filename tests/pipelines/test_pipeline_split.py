"""How a job's users are cut into actor calls."""
from __future__ import annotations

import pytest

from prefixfleet.pipelines.training.fleet import split


@pytest.mark.parametrize("users,actors,pack", [(1000, 2, 8), (50, 2, 8), (6, 2, 8), (8, 1, 2), (1, 4, 8), (0, 2, 8)])
def test_packed_chunks_cover_every_user_in_order_and_shrink_towards_the_end(users: int, actors: int, pack: int) -> None:
    chunks = split(list(range(users)), actors, pack, isolated=False)
    assert [u for chunk in chunks for u in chunk] == list(range(users))
    sizes = [len(c) for c in chunks]
    assert all(0 < s <= 4 * pack for s in sizes)
    assert sizes == sorted(sizes, reverse=True)
    assert not sizes or sizes[-1] <= pack
    assert len(chunks) >= min(users, actors)


def test_isolated_is_one_user_per_call() -> None:
    assert split(list("abc"), 2, 8, isolated=True) == [["a"], ["b"], ["c"]]
