"""Bounded in-memory caches for the read path.

ResolutionCache maps (model name, alias or version) to a VersionRef. An entry is served as is for
`ttl` seconds, then for another `ttl` while the caller refreshes it in the background; after
2 × ttl it is a miss. Our own writes invalidate a user at once (a generation counter stops a
refresh that started before the write from storing its older answer). Staleness bound: a change
made by another process is seen within 2 × ttl plus one MLflow round trip.

ContentCache holds verified artifact bytes keyed by (namespace, user, sha256), limited in bytes.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from cachetools import LRUCache

V = TypeVar("V")


class ResolutionCache(Generic[V]):
    def __init__(self, ttl: float = 1.0, max_users: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.clock = ttl, clock
        self._users: LRUCache[str, dict[Hashable, tuple[float, V]]] = LRUCache(maxsize=max_users)
        self._generations: LRUCache[str, int] = LRUCache(maxsize=max_users)
        self._lock = threading.Lock()

    def get(self, name: str, selector: Hashable) -> tuple[V | None, bool]:
        """(value, needs_refresh); (None, False) on a miss."""
        with self._lock:
            entry = (self._users.get(name) or {}).get(selector)
        if entry is None:
            return None, False
        age = self.clock() - entry[0]
        if age >= 2 * self.ttl:
            return None, False
        return entry[1], age >= self.ttl

    def generation(self, name: str) -> int:
        with self._lock:
            return self._generations.get(name, 0)

    def put(self, name: str, selector: Hashable, value: V, generation: int) -> None:
        """Store unless `name` was invalidated since `generation` was read."""
        with self._lock:
            if self._generations.get(name, 0) != generation:
                return
            selectors = self._users.get(name)
            if selectors is None:
                selectors = self._users[name] = {}
            selectors[selector] = (self.clock(), value)

    def invalidate(self, name: str) -> None:
        with self._lock:
            self._users.pop(name, None)
            self._generations[name] = self._generations.get(name, 0) + 1


class ContentCache:
    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self._items: LRUCache[tuple[str, str, str], bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)
        self._lock = threading.Lock()

    def get(self, namespace: str, user_id: str, sha256: str) -> bytes | None:
        with self._lock:
            return self._items.get((namespace, user_id, sha256))

    def put(self, namespace: str, user_id: str, sha256: str, data: bytes) -> None:
        if len(data) > self._items.maxsize:
            return
        with self._lock:
            self._items[(namespace, user_id, sha256)] = data

    def drop_user(self, namespace: str, user_id: str) -> None:
        with self._lock:
            for item in [k for k in self._items if k[:2] == (namespace, user_id)]:
                del self._items[item]
