"""A publish that builds on the plan's bulk read (`published=`): a returning user's publish and
promote in one create, the alias writes and one read back; and when the plan was overtaken or
publishes race, the same guarantees as any publish — distinct versions, exactly once, each alias
on the newest version that asked for it, an index the next plan can trust, rollback intact."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from prefixfleet.registry import Registry, UserKey, VersionRef
from prefixfleet.registry.index import Published
from tests.fixtures.artifacts import make_artifact
from tests.fixtures.counting import CountingCatalog

KEY = UserKey("plan", "rita")
WRITERS = 8


def _artifact(data: str, seed: int = 0) -> bytes:
    return make_artifact(KEY.namespace, KEY.user_id, data_fingerprint=data, seed=seed)


def _plan(registry: Registry) -> Published:
    published = registry.published([KEY])[KEY]
    assert published is not None, "the index is trusted after every publish"
    return published


def _counted(registry: Registry, publish) -> tuple[VersionRef, dict[str, int]]:
    counting = CountingCatalog(registry.catalog)
    registry.catalog = counting
    try:
        return publish(), dict(counting.calls)
    finally:
        registry.catalog = counting.inner


def test_a_returning_users_publish_and_promote_is_one_create_two_alias_writes_and_one_read(registry):
    first = registry.publish(KEY, _artifact("d1"), promote=True)
    plan = _plan(registry)
    ref, calls = _counted(registry, lambda: registry.publish(KEY, _artifact("d2"), promote=True, published=plan))
    assert calls == {"create_version": 1, "set_alias": 2, "get_model": 1}
    assert (ref.version, ref.aliases) == (2, ["candidate", "production"])
    registry.invalidate(KEY)
    assert registry.resolve(KEY).version == registry.resolve(KEY, "candidate").version == 2
    after = _plan(registry)
    assert [v.version for v in after.versions] == [2, 1] and after.production == 2 and after.complete
    assert registry.production_history(KEY) == [first.version, 2]
    assert registry.rollback(KEY).version == 1

    plan = _plan(registry)
    ref, calls = _counted(registry, lambda: registry.publish(KEY, _artifact("d3"), published=plan))
    assert calls == {"create_version": 1, "set_alias": 1, "get_model": 1}
    assert ref.aliases == ["candidate"] and registry.resolve(KEY, fresh=True).version == 1


def test_a_new_users_publish_and_promote_is_two_creates_two_alias_writes_and_one_read(registry):
    ref, calls = _counted(registry, lambda: registry.publish(KEY, _artifact("d1"), promote=True,
                                                             published=Published(KEY)))
    assert calls == {"create_model": 1, "create_version": 1, "set_alias": 2, "get_model": 1}
    assert (ref.version, ref.aliases) == (1, ["candidate", "production"])
    registry.invalidate(KEY)
    assert registry.resolve(KEY).version == registry.resolve(KEY, "candidate").version == 1
    plan = _plan(registry)  # its index is trusted: the next plan needs no look-up of its own
    assert [v.version for v in plan.versions] == [1] and plan.production == 1 and plan.complete
    assert registry.production_history(KEY) == [1]
    twin = registry.publish(KEY, _artifact("d1", seed=3), promote=True, published=Published(KEY))  # a stale plan
    assert twin.version == 1 and [r.version for r in registry.history(KEY)] == [1]


def test_a_plan_already_published_from_is_settled_like_any_publish(registry):
    registry.publish(KEY, _artifact("d1"), promote=True)
    plan = _plan(registry)  # two jobs read the same plan; the second publishes after the first
    one = registry.publish(KEY, _artifact("d2"), promote=True, published=plan)
    two = registry.publish(KEY, _artifact("d3"), promote=True, published=plan)
    twin = registry.publish(KEY, _artifact("d2", seed=5), promote=True, published=plan)
    assert (one.version, two.version, twin.version) == (2, 3, 2)
    assert [r.version for r in registry.history(KEY)] == [3, 2, 1]
    registry.invalidate(KEY)
    assert registry.resolve(KEY).version == registry.resolve(KEY, "candidate").version == 3
    assert [v.version for v in _plan(registry).versions] == [3, 2, 1]
    assert registry.production_history(KEY) == [1, 2, 3]
    assert registry.rollback(KEY).version == 2 and registry.rollback(KEY).version == 1


def test_racing_publishes_from_one_plan_leave_each_alias_on_the_newest(registry):
    registry.publish(KEY, _artifact("d0"), promote=True)
    plan = _plan(registry)
    start = threading.Barrier(WRITERS)

    def publish(i: int) -> VersionRef:
        start.wait()
        return registry.publish(KEY, _artifact(f"d{i % 4 + 1}", seed=i), promote=True, published=plan)

    with ThreadPoolExecutor(WRITERS) as pool:
        refs = list(pool.map(publish, range(WRITERS)))
    versions = [r.version for r in registry.history(KEY)]
    assert len(versions) == 5 and {r.version for r in refs} == set(versions) - {1}  # four results, once each
    registry.invalidate(KEY)
    assert registry.resolve(KEY).version == registry.resolve(KEY, "candidate").version == max(versions)
    after = _plan(registry)  # it may also list a twin that a racing publish deleted after its read
    assert set(versions) <= {v.version for v in after.versions} and after.production == max(versions)
    assert registry.production_history(KEY)[-1] == max(versions)


def test_a_promote_after_planned_publishes_keeps_their_history(registry):
    registry.publish(KEY, _artifact("d1"), promote=True)
    for data in ("d2", "d3"):
        registry.publish(KEY, _artifact(data), promote=True, published=_plan(registry))
    registry.promote(KEY, 1)
    assert registry.production_history(KEY) == [1, 2, 3, 1]
    assert registry.rollback(KEY).version == 3


def test_a_planned_publish_overtaken_before_its_alias_writes_leaves_them_on_the_newer_version(registry):
    """Its create came right after the plan, but a newer publish settled before its aliases were
    written: the read back sees the newer version and the aliases go back to it."""
    registry.publish(KEY, _artifact("d0"), promote=True)
    plan = _plan(registry)
    real, created, newer_done, out = registry.catalog, threading.Event(), threading.Event(), []

    class Paused:
        """The catalog, with the slow publisher's alias writes held until the newer one is done."""

        def __getattr__(self, name: str):
            return getattr(real, name)

        def create_version(self, *args, **kwargs):
            record = real.create_version(*args, **kwargs)
            if threading.current_thread().name == "slow":
                created.set()
            return record

        def set_alias(self, *args):
            if threading.current_thread().name == "slow":
                newer_done.wait(30)
            return real.set_alias(*args)

    registry.catalog = Paused()
    try:
        slow = threading.Thread(name="slow", target=lambda: out.append(
            registry.publish(KEY, _artifact("d1"), promote=True, published=plan)))
        slow.start()
        assert created.wait(30)
        newer = registry.publish(KEY, _artifact("d2"), promote=True, published=plan)
        newer_done.set()
        slow.join(30)
    finally:
        registry.catalog = real
    assert (out[0].version, out[0].aliases, newer.version) == (2, [], 3)
    registry.invalidate(KEY)
    assert registry.resolve(KEY).version == registry.resolve(KEY, "candidate").version == 3
    assert [v.version for v in _plan(registry).versions] == [3, 2, 1]
    assert registry.production_history(KEY) == [1, 3]  # 2 never held production for good
