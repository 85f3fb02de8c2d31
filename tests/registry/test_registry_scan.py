"""The catalog's bulk read (`Catalog.scan`), behind fsck: a SQL backend reads MLflow's tables
straight, and must return exactly what paging MLflow's own searches returns, page boundaries,
deleted versions, aliases, tags and other registries' models included."""
from __future__ import annotations

import pytest

from prefixfleet.registry import Registry, UserKey, gc
from prefixfleet.registry.catalog import Catalog
from prefixfleet.registry.catalog import sql as sql_catalog
from tests.fixtures.artifacts import make_artifact
from tests.fixtures.counting import CountingCatalog


def _publish(registry: Registry, key: UserKey, data: str, **kwargs: object):
    return registry.publish(key, make_artifact(key.namespace, key.user_id, data_fingerprint=data), **kwargs)


def _fill(registry: Registry) -> None:
    """Users of two namespaces (one with `_`, a LIKE wildcard): several versions, promotions, a
    deleted version, a model left without versions, and a model of another registry beside them."""
    for i in range(5):
        key = UserKey("ns_a", f"user-{i}")
        for data in range(1 + i % 3):
            ref = _publish(registry, key, f"d{data}")
        if i % 2:
            registry.promote(key, ref.version)
    for user in ("b-1", "b/2 with space", "b.3"):
        _publish(registry, UserKey("nsxa", user), "d0", promote=True)
    registry.catalog.delete_version(UserKey("ns_a", "user-2").model_name(registry.prefix), 2)
    emptied = UserKey("ns_a", "user-0").model_name(registry.prefix)
    registry.catalog.delete_version(emptied, 1)
    registry.catalog.create_model(f"other{registry.prefix}.ns_a.user-9", {})


def _pages(catalog: Catalog, pattern: str, scan) -> list:  # noqa: ANN001 - a bound or unbound scan
    out, cursor = [], None
    while True:
        page, cursor = scan(catalog, pattern, cursor)
        out.extend(page)
        if not cursor:
            return out


def test_the_bulk_read_equals_mlflows_searches(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    _fill(registry)
    monkeypatch.setattr(sql_catalog, "SCAN_PAGE", 3)  # keyset pages end inside the registry
    backend = registry.catalog.inner
    for pattern in (f"{registry.prefix}.%", f"{registry.prefix}.ns_a.%"):
        ours = _pages(backend, pattern, type(backend).scan)
        searched = _pages(backend, pattern, Catalog.scan)
        assert ours == searched
    everyone = _pages(backend, f"{registry.prefix}.%", type(backend).scan)
    assert len(everyone) == 8
    versions = {model.name.rsplit(".", 1)[-1]: [v.version for v in records] for model, records in everyone}
    assert versions["user-2"] == [3, 1] and versions["user-0"] == [] and versions["user-4"] == [2, 1]


def test_scan_streams_every_user_of_the_registry_or_of_one_namespace(registry: Registry) -> None:
    _fill(registry)
    users = [(key.namespace, key.user_id, model.latest, [v.version for v in records])
             for key, model, records in registry.scan()]
    assert ("nsxa", "b/2 with space", 1, [1]) in users and ("ns_a", "user-0", 0, []) in users
    assert len(users) == 8
    assert {key.user_id for key, _, _ in registry.scan("ns_a")} == {f"user-{i}" for i in range(5)}


def test_gc_reads_only_users_past_keep_last(registry: Registry) -> None:
    key, other = UserKey("gc", "many"), UserKey("gc", "few")
    for data in range(4):
        _publish(registry, key, f"d{data}")
    _publish(registry, other, "d0")
    registry.promote(key, 1)
    counting = CountingCatalog(registry.catalog)
    registry.catalog = counting

    removed = gc(registry, keep_last=2)

    assert sorted(r.version for r in removed) == [2]  # version 1 is production
    # one search for versions past keep_last, then the model and versions of that one user only
    assert counting.calls == {"search_versions": 2, "search_models": 1, "delete_version": 1}
    assert [v.version for v in registry.history(key)] == [4, 3, 1]
