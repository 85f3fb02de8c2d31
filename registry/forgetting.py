"""Forgetting many users: `Registry.forget` for each, a few at a time, receipts in input order.

Memory stays flat whatever the number of users: at most `window` users are read ahead of the
receipt last handed out. Each forget is idempotent, so a run cut short is finished by running it
again. A user whose forget fails (retries spent) is reported with the reason and the others go
on, except when a server stays unreachable past the outage deadline: then no more forgets start,
and the users not started are reported as such.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from prefixfleet.registry.errors import RegistryError, Unavailable
from prefixfleet.registry.keys import UserKey
from prefixfleet.registry.refs import ForgetReceipt
from prefixfleet.registry.registry import Registry

WORKERS = 8
NOT_STARTED = "not started: "


@dataclass(frozen=True)
class ForgetResult:
    """One user's forget: its receipt, or why there is none."""

    key: UserKey
    receipt: ForgetReceipt | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.receipt is not None


def forget_all(registry: Registry, keys: Iterable[UserKey], *, workers: int = WORKERS) -> Iterator[ForgetResult]:
    """Forget every user of `keys`, `workers` at a time; one `ForgetResult` per key, in order."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    window = 4 * workers
    pending: deque[tuple[UserKey, Future[ForgetReceipt] | None]] = deque()
    down: Unavailable | None = None
    with ThreadPoolExecutor(workers, thread_name_prefix="forget") as pool:
        for key in keys:
            pending.append((key, pool.submit(registry.forget, key) if down is None else None))
            while len(pending) >= window:
                result, down = _settle(*pending.popleft(), down)
                yield result
        while pending:
            result, down = _settle(*pending.popleft(), down)
            yield result


def _settle(key: UserKey, future: Future[ForgetReceipt] | None,
            down: Unavailable | None) -> tuple[ForgetResult, Unavailable | None]:
    if future is None:
        return ForgetResult(key, None, f"{NOT_STARTED}{down}"), down
    try:
        return ForgetResult(key, future.result()), down
    except Unavailable as exc:
        return ForgetResult(key, None, str(exc)), down or exc
    except RegistryError as exc:
        return ForgetResult(key, None, str(exc)), down
