"""Every catalog operation retried through transient failures (5xx and 429, connection resets,
lost responses, a locked database, a write race) with jittered exponential backoff inside a
per-operation deadline; retries counted, and a warning when one gives up.

Retrying is safe because each operation is idempotent or made so by its caller: tags and aliases
are upserts; a delete that now finds nothing after an attempt whose response was lost has
succeeded; a create-version whose first response was lost leaves a twin with the same identity,
which `Registry.publish` settles (the oldest twin is kept, the younger deleted).
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from prefixfleet.registry.catalog.base import Catalog, Missing, ModelRecord, Transient, VersionRecord

T = TypeVar("T")
log = logging.getLogger("prefixfleet.registry")
DEADLINE_VAR = "PREFIXFLEET_RETRY_DEADLINE_S"


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
        if deadline <= 0:
            raise ValueError(f"{DEADLINE_VAR} must be positive, got {value!r}")
        return cls(deadline_s=deadline)

    def wait(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap_s, self.base_s * 2 ** min(attempt, 16)))


class RetryingCatalog(Catalog):
    """`inner` with every operation retried under `policy`; `retries` counts retries by operation."""

    def __init__(self, inner: Catalog, policy: RetryPolicy | None = None) -> None:
        self.inner = inner
        self.policy = policy or RetryPolicy.from_env()
        self.retries: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _run(self, operation: str, call: Callable[[], T], *, deleting: bool = False) -> T | None:
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                return call()
            except Missing:
                if deleting and attempt:  # an earlier attempt may have deleted it: gone either way
                    return None
                raise
            except Transient as exc:
                delay = self.policy.wait(attempt)
                elapsed = time.monotonic() - started
                if elapsed + delay > self.policy.deadline_s:
                    log.warning("MLflow %s failed %d times in %.1f s; giving up: %s", operation, attempt + 1, elapsed, exc)
                    raise Transient(f"{exc} (gave up after {attempt + 1} attempts in {elapsed:.1f} s)") from exc
                with self._lock:
                    self.retries[operation] += 1
                log.debug("MLflow %s: %s; retrying in %.3f s", operation, exc, delay)
                time.sleep(delay)
                attempt += 1

    def create_model(self, name: str, tags: dict[str, str]) -> bool:
        return self._run("create_model", lambda: self.inner.create_model(name, tags))

    def get_model(self, name: str) -> ModelRecord | None:
        return self._run("get_model", lambda: self.inner.get_model(name))

    def delete_model(self, name: str) -> None:
        self._run("delete_model", lambda: self.inner.delete_model(name), deleting=True)

    def search_models(self, name_like: str, page_token: str | None) -> tuple[list[ModelRecord], str | None]:
        return self._run("search_models", lambda: self.inner.search_models(name_like, page_token))

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self._run("set_model_tag", lambda: self.inner.set_model_tag(name, key, value))

    def create_version(self, name: str, source: str, tags: dict[str, str]) -> VersionRecord:
        return self._run("create_version", lambda: self.inner.create_version(name, source, tags))

    def get_version(self, name: str, version: int) -> VersionRecord | None:
        return self._run("get_version", lambda: self.inner.get_version(name, version))

    def get_version_by_alias(self, name: str, alias: str) -> VersionRecord | None:
        return self._run("get_version_by_alias", lambda: self.inner.get_version_by_alias(name, alias))

    def search_versions(self, filter_string: str, *, order_by: str, max_results: int,
                        page_token: str | None = None) -> tuple[list[VersionRecord], str | None]:
        return self._run("search_versions", lambda: self.inner.search_versions(
            filter_string, order_by=order_by, max_results=max_results, page_token=page_token))

    def delete_version(self, name: str, version: int) -> None:
        self._run("delete_version", lambda: self.inner.delete_version(name, version), deleting=True)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._run("set_alias", lambda: self.inner.set_alias(name, alias, version))

    def delete_alias(self, name: str, alias: str) -> None:
        self._run("delete_alias", lambda: self.inner.delete_alias(name, alias), deleting=True)

    def close(self) -> None:
        self.inner.close()
