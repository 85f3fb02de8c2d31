"""Waiting requests, fair across tenants: each tenant has its own line, bounded, and admission
takes the tenants' heads in turn, so a tenant that floods the server waits behind its own
requests, never in front of another tenant's."""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """No room to wait: the message says whose line (or the whole queue) is full."""


class FairQueue(Generic[T]):
    """Not thread-safe: the engine holds its lock around every call."""

    def __init__(self, per_tenant: int, total: int) -> None:
        if per_tenant < 1 or total < per_tenant:
            raise ValueError("need 1 ≤ per_tenant ≤ total")
        self.per_tenant, self.total = per_tenant, total
        self._lines: OrderedDict[Hashable, deque[T]] = OrderedDict()  # the next tenant to serve first
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, tenant: Hashable, item: T) -> None:
        line = self._lines.get(tenant)
        if line is not None and len(line) >= self.per_tenant:
            raise QueueFull(f"{len(line)} requests of namespace {tenant!r} are already waiting, the most one "
                            "namespace may queue; retry later")
        if self._size >= self.total:
            raise QueueFull(f"{self._size} requests are already waiting, the most this server queues; retry later")
        if line is None:
            line = self._lines[tenant] = deque()
        line.append(item)
        self._size += 1

    def head(self) -> T | None:
        """The request admission considers next: the oldest of the tenant whose turn it is."""
        return next(iter(self._lines.values()))[0] if self._lines else None

    def pop(self) -> T:
        """Take `head()`; that tenant's turn goes to the back."""
        tenant, line = next(iter(self._lines.items()))
        item = line.popleft()
        self._size -= 1
        if line:
            self._lines.move_to_end(tenant)
        else:
            del self._lines[tenant]
        return item
