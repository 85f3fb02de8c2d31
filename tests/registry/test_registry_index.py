"""The published index (registry.index): one search of registered models tells a planner, for a
chunk of users, which versions exist with which identity and which is in production — and it is
trusted only while the newest version's index accounts for every version below it."""
from __future__ import annotations

import pytest

from prefixfleet.registry import Registry, UserKey
from prefixfleet.registry.catalog import base as catalog_base
from prefixfleet.registry.header import read_header
from prefixfleet.registry.index import INDEX
from tests.fixtures.artifacts import make_artifact


def _publish(registry: Registry, key: UserKey, data: str, **kwargs: object):
    return registry.publish(key, make_artifact(key.namespace, key.user_id, data_fingerprint=data), **kwargs)


def test_bulk_read_lists_each_users_versions_production_and_unknown_users(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog_base, "NAMES_PER_SEARCH", 2)  # several batches from 5 users
    keys = [UserKey("idx", f"u{i}") for i in range(4)]
    for i, key in enumerate(keys[:3]):
        first = _publish(registry, key, "d1", run_id=f"run-{i}")
        registry.promote(key, first.version)
        _publish(registry, key, "d2")
    found = registry.published([*keys, UserKey("other", "u0")])

    assert set(found) == {*keys, UserKey("other", "u0")}
    for i, key in enumerate(keys[:3]):
        entry = found[key]
        assert entry is not None and entry.complete and entry.production == 1
        assert [v.version for v in entry.versions] == [2, 1]
        one = entry.version(1)
        header = read_header(registry.fetch(key, version=1))
        assert (one.identity, one.data_fingerprint, one.backbone_fingerprint, one.run_id) == (
            header.identity, "d1", "backbone-1", f"run-{i}")
        assert entry.oldest(header.identity) == one
    unknown = found[keys[3]]
    assert unknown is not None and unknown.versions == () and unknown.production is None


def test_long_user_ids_are_read_in_batches_a_server_accepts(registry: Registry) -> None:
    keys = [UserKey("idx", f"{'long-' * 38}{i:02d}") for i in range(24)]  # 24 × ~210 characters of filter
    for key in keys:
        _publish(registry, key, "d1")
    names = [key.model_name(registry.prefix) for key in keys]
    batches = list(catalog_base.name_batches(names))
    assert len(batches) > 1 and [n for b in batches for n in b] == names
    assert all(len(", ".join(f"'{n}'" for n in b)) <= catalog_base.FILTER_CHARS for b in batches)
    found = registry.published(keys)
    assert all(found[k] is not None and [v.version for v in found[k].versions] == [1] for k in keys)


def test_an_index_not_written_after_the_version_below_is_not_trusted(registry: Registry) -> None:
    key = UserKey("idx", "stale")
    name = key.model_name(registry.prefix)
    _publish(registry, key, "d1")
    _publish(registry, key, "d2")
    assert registry.published([key])[key] is not None
    # as a publish whose plan was overtaken leaves it until it has settled (or when it stopped)
    registry.catalog.set_version_tag(name, 2, INDEX, '{"after": 0, "complete": true, "versions": []}')
    assert registry.published([key])[key] is None


def test_a_version_without_a_readable_index_is_left_to_the_per_user_lookup(registry: Registry) -> None:
    key = UserKey("idx", "legacy")
    _publish(registry, key, "d1")
    registry.catalog.set_version_tag(key.model_name(registry.prefix), 1, INDEX, "not json")
    assert registry.published([key])[key] is None


def test_forget_takes_the_index_with_the_model(registry: Registry) -> None:
    key = UserKey("idx", "gone")
    _publish(registry, key, "d1")
    registry.forget(key)
    entry = registry.published([key])[key]
    assert entry is not None and entry.versions == ()
