"""One retry rule for both servers. An operation that fails transiently (5xx or 429, a reset or
refused connection, a lost response, a locked database, a write race) is tried again with
jittered exponential backoff until it succeeds or its deadline passes: the outage deadline,
`PREFIXFLEET_RETRY_DEADLINE_S` (30 s unless set; `train` and `retrain` set it from
`--outage-deadline`). A server silent for a couple of seconds is logged once, its recovery too;
past the deadline the operation raises `Unavailable`, naming the server and how long it tried.
Inside `waiting_at_most(s)` a thread's operations give up after `s` seconds at most (a job's first
contact with its servers: an unreachable one ends the job at once, not after the outage deadline).
"""
from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from prefixfleet.registry.errors import Unavailable

T = TypeVar("T")
log = logging.getLogger("prefixfleet.registry")
DEADLINE_VAR = "PREFIXFLEET_RETRY_DEADLINE_S"
NOTICE_S = 2.0  # a server silent this long gets a log line
_cap = threading.local()


@contextmanager
def waiting_at_most(seconds: float) -> Iterator[None]:
    """Operations this thread runs inside give up after `seconds` at most, whatever their policy."""
    before = getattr(_cap, "seconds", math.inf)
    _cap.seconds = min(before, seconds)
    try:
        yield
    finally:
        _cap.seconds = before


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts go on until `deadline_s` has passed since the first; waits are uniform in
    [0, min(cap_s, base_s * 2**attempt)] ("full jitter")."""

    deadline_s: float = 30.0
    base_s: float = 0.02
    cap_s: float = 2.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        value = os.environ.get(DEADLINE_VAR)
        try:
            deadline = float(value) if value else cls.deadline_s
        except ValueError as exc:
            raise ValueError(f"{DEADLINE_VAR}={value!r} is not a number of seconds") from exc
        if not deadline > 0:
            raise ValueError(f"{DEADLINE_VAR} must be a positive number of seconds, got {value!r}")
        return cls(deadline_s=deadline)

    def wait(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap_s, self.base_s * 2 ** min(attempt, 16)))

    def run(self, server: str, operation: str, call: Callable[[], T], transient: Callable[[Exception], bool],
            on_retry: Callable[[], None] | None = None) -> T:
        """`call()` until it succeeds, raises something not `transient`, or the deadline passes."""
        started = time.monotonic()
        deadline = min(self.deadline_s, getattr(_cap, "seconds", math.inf))
        attempt, noticed = 0, False
        while True:
            try:
                result = call()
            except Exception as exc:
                if not transient(exc):
                    raise
                elapsed = time.monotonic() - started
                if elapsed >= deadline:
                    log.warning("%s %s: giving up after %d attempts in %.1f s: %s", server, operation, attempt + 1,
                                elapsed, exc)
                    raise Unavailable(f"{server} unreachable: {operation} failed {attempt + 1} times in {elapsed:.1f} s "
                                      f"(deadline {deadline:g} s, {DEADLINE_VAR}): {exc}") from exc
                if not noticed and elapsed >= NOTICE_S:
                    noticed = True
                    log.warning("%s not answering for %.1f s (%s: %s); retrying for up to %g s", server, elapsed,
                                operation, exc, deadline)
                if on_retry is not None:
                    on_retry()
                time.sleep(min(self.wait(attempt), deadline - elapsed))  # the last try at the deadline
                attempt += 1
                continue
            if noticed:
                log.warning("%s answers again: %s succeeded after %.1f s", server, operation, time.monotonic() - started)
            return result
