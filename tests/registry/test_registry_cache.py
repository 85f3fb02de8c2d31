"""Resolution cache TTL / refresh / invalidation, and the byte-bounded content cache."""
from __future__ import annotations

from prefixfleet.registry.cache import ContentCache, ResolutionCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_entries_are_fresh_then_served_while_refreshing_then_gone():
    clock = Clock()
    cache: ResolutionCache[str] = ResolutionCache(ttl=1.0, clock=clock)
    cache.put("m", "production", "v1", cache.generation("m"))
    assert cache.get("m", "production") == ("v1", False)
    clock.now = 1.5
    assert cache.get("m", "production") == ("v1", True)
    clock.now = 2.0
    assert cache.get("m", "production") == (None, False)


def test_invalidation_drops_the_user_and_blocks_an_older_refresh():
    cache: ResolutionCache[str] = ResolutionCache(ttl=10)
    started = cache.generation("m")
    cache.put("m", "production", "v1", started)
    cache.invalidate("m")
    assert cache.get("m", "production") == (None, False)
    cache.put("m", "production", "v1-from-before-the-write", started)
    assert cache.get("m", "production") == (None, False)
    cache.put("m", "production", "v2", cache.generation("m"))
    assert cache.get("m", "production") == ("v2", False)


def test_resolution_cache_is_bounded_in_users():
    cache: ResolutionCache[int] = ResolutionCache(ttl=10, max_users=3)
    for i in range(10):
        cache.put(f"m{i}", "a", i, cache.generation(f"m{i}"))
    assert sum(cache.get(f"m{i}", "a")[0] is not None for i in range(10)) == 3


def test_content_cache_is_bounded_in_bytes_and_keyed_by_user():
    cache = ContentCache(max_bytes=100)
    cache.put("ns", "a", "s1", b"x" * 60)
    cache.put("ns", "a", "s2", b"y" * 60)
    assert cache.get("ns", "a", "s1") is None and cache.get("ns", "a", "s2") == b"y" * 60
    assert cache.get("ns", "b", "s2") is None
    cache.put("ns", "a", "big", b"z" * 101)
    assert cache.get("ns", "a", "big") is None
    cache.drop_user("ns", "a")
    assert cache.get("ns", "a", "s2") is None
