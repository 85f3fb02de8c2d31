"""Every catalog operation retried under the registry's retry rule (`prefixfleet.registry.retry`),
retries counted by operation.

Retrying is safe because each operation is idempotent or made so by its caller: tags and aliases
are upserts; a delete that finds nothing after an attempt whose response was lost has succeeded;
a create-version whose response was lost leaves a version carrying the same publish token, which
`Registry.publish` deletes once it has settled which version it keeps.
"""
from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from prefixfleet.registry.catalog.base import Catalog, Missing, ModelRecord, Transient, VersionRecord
from prefixfleet.registry.retry import RetryPolicy

T = TypeVar("T")


class RetryingCatalog(Catalog):
    """`inner` with every operation retried under `policy`; `retries` counts retries by operation."""

    def __init__(self, inner: Catalog, policy: RetryPolicy | None = None) -> None:
        self.inner = inner
        self.policy = policy or RetryPolicy.from_env()
        self.retries: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _run(self, operation: str, call: Callable[[], T]) -> T:
        def count() -> None:
            with self._lock:
                self.retries[operation] += 1

        return self.policy.run("MLflow", operation, call, lambda exc: isinstance(exc, Transient), count)

    def _delete(self, operation: str, call: Callable[[], None]) -> None:
        tried = False

        def attempt() -> None:
            nonlocal tried
            try:
                call()
            except Missing:
                if not tried:
                    raise
                # an earlier attempt, whose answer was lost, deleted it
            finally:
                tried = True

        self._run(operation, attempt)

    def create_model(self, name: str, tags: dict[str, str]) -> bool:
        return self._run("create_model", lambda: self.inner.create_model(name, tags))

    def get_model(self, name: str) -> ModelRecord | None:
        return self._run("get_model", lambda: self.inner.get_model(name))

    def delete_model(self, name: str) -> None:
        self._delete("delete_model", lambda: self.inner.delete_model(name))

    def search_models(self, filter_string: str, page_token: str | None) -> tuple[list[ModelRecord], str | None]:
        return self._run("search_models", lambda: self.inner.search_models(filter_string, page_token))

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self._run("set_model_tag", lambda: self.inner.set_model_tag(name, key, value))

    def create_version(self, name: str, source: str, tags: dict[str, str], run_id: str = "") -> VersionRecord:
        return self._run("create_version", lambda: self.inner.create_version(name, source, tags, run_id))

    def set_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        self._run("set_version_tag", lambda: self.inner.set_version_tag(name, version, key, value))

    def get_version(self, name: str, version: int) -> VersionRecord | None:
        return self._run("get_version", lambda: self.inner.get_version(name, version))

    def get_version_by_alias(self, name: str, alias: str) -> VersionRecord | None:
        return self._run("get_version_by_alias", lambda: self.inner.get_version_by_alias(name, alias))

    def search_versions(self, filter_string: str, *, order_by: str, max_results: int,
                        page_token: str | None = None) -> tuple[list[VersionRecord], str | None]:
        return self._run("search_versions", lambda: self.inner.search_versions(
            filter_string, order_by=order_by, max_results=max_results, page_token=page_token))

    def delete_version(self, name: str, version: int) -> None:
        self._delete("delete_version", lambda: self.inner.delete_version(name, version))

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._run("set_alias", lambda: self.inner.set_alias(name, alias, version))

    def delete_alias(self, name: str, alias: str) -> None:
        self._delete("delete_alias", lambda: self.inner.delete_alias(name, alias))

    def scan(self, pattern: str, cursor: str | None) -> tuple[list[tuple[ModelRecord, list[VersionRecord]]], str | None]:
        return self._run("scan", lambda: self.inner.scan(pattern, cursor))  # a page is a read: retried whole

    def close(self) -> None:
        self.inner.close()
