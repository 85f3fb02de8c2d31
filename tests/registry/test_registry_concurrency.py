"""Concurrent writers for one user: distinct versions, no lost alias update, and exactly once
(invariant 5) when the same training result is published by racing retries."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from prefixfleet.registry import UserKey, VersionRef
from prefixfleet.registry.refs import IDENTITY, version_list
from tests.fixtures.artifacts import make_artifact

CAROL = UserKey("default", "carol")
WRITERS = 8


def _race(registry, artifacts: list[bytes], key: UserKey = CAROL) -> list[VersionRef]:
    start = threading.Barrier(len(artifacts))

    def publish(artifact: bytes) -> VersionRef:
        start.wait()
        return registry.publish(key, artifact)

    with ThreadPoolExecutor(len(artifacts)) as pool:
        return list(pool.map(publish, artifacts))


def test_eight_writers_get_distinct_versions_and_the_alias_ends_on_the_newest(registry):
    for user in ("carol", "dan", "erin"):  # three races: a lost update shows in at least one
        key = UserKey("default", user)
        refs = _race(registry, [make_artifact("default", user, data_fingerprint=f"d{i}", seed=i)
                                for i in range(WRITERS)], key)
        assert sorted(r.version for r in refs) == list(range(1, WRITERS + 1))
        assert [r.version for r in registry.history(key)] == list(range(WRITERS, 0, -1))
        registry.invalidate(key)
        assert registry.resolve(key, "candidate").version == WRITERS
        for ref in refs:
            assert registry.fetch(key, version=ref.version) == registry.fetch_ref(ref)


def test_racing_retries_of_one_training_result_leave_exactly_one_version(registry):
    retries = [make_artifact("default", "carol", data_fingerprint="same", seed=i) for i in range(WRITERS)]
    refs = _race(registry, retries)
    assert {r.version for r in refs} == {1} and len({r.sha256 for r in refs}) == 1
    history = registry.history(CAROL)
    assert [(r.version, r.aliases) for r in history] == [(1, ["candidate"])]
    assert [k for k, _ in registry.store.list()] == [CAROL.object_key(refs[0].sha256)]
    assert registry.fetch(CAROL, "candidate") == registry.fetch_ref(refs[0])
    later = registry.publish(CAROL, make_artifact("default", "carol", data_fingerprint="same", seed=99))
    assert later.version == 1


def test_a_retry_racing_new_results_keeps_every_result_once(registry):
    artifacts = [make_artifact("default", "carol", data_fingerprint=f"d{i % 4}", seed=i) for i in range(WRITERS)]
    refs = _race(registry, artifacts)
    history = registry.history(CAROL)
    assert len(history) == 4 and len({r.version for r in refs}) == 4
    assert len({registry.catalog.get_version(CAROL.model_name(registry.prefix), r.version).tags[IDENTITY]
                for r in history}) == 4
    registry.invalidate(CAROL)
    assert registry.resolve(CAROL, "candidate").version == max(r.version for r in history)


def test_concurrent_promotes_leave_the_production_history_ending_at_production(registry):
    published = [registry.publish(CAROL, make_artifact("default", "carol", data_fingerprint=f"p{i}", seed=i))
                 for i in range(WRITERS)]
    name = CAROL.model_name(registry.prefix)
    for _ in range(3):  # three races: a lost update shows in at least one
        start = threading.Barrier(WRITERS)

        def promote(ref: VersionRef, start: threading.Barrier = start) -> None:
            start.wait()
            registry.promote(CAROL, ref.version)

        with ThreadPoolExecutor(WRITERS) as pool:
            list(pool.map(promote, published))
        model = registry.catalog.get_model(name)
        assert version_list(model.tags)[-1] == model.aliases["production"]
    current = model.aliases["production"]
    assert registry.rollback(CAROL).version not in (current, None)
