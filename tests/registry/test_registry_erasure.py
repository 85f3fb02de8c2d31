"""Erasure (invariant 4): after forget, a scan of every MLflow table and of the whole object store
finds nothing of the user, and other users are untouched; a publish that a forget overtakes, or
one from work begun before the forget, leaves nothing behind."""
from __future__ import annotations

import uuid

import pytest

from prefixfleet.registry import ErasureSnapshot, Forgotten, Registry, UserKey, fsck, gc
from tests.fixtures.artifacts import make_artifact
from tests.fixtures.tamper import database_of, rows_mentioning


def test_forget_leaves_nothing_of_the_user_in_mlflow_or_the_store(registry, request):
    user = f"erase-me-{uuid.uuid4().hex[:8]}"
    key, other = UserKey("default", user), UserKey("default", f"bystander-{uuid.uuid4().hex[:8]}")
    shas = []
    for i in range(4):
        ref = registry.publish(key, make_artifact("default", user, data_fingerprint=f"d{i}", seed=i),
                               metrics={"eval_loss": i}, run_id=f"run-{user}-{i}", tags={"owner": user})
        shas.append(ref.sha256)
    registry.promote(key, 2)
    registry.promote(key, 3)
    gc(registry, key, keep_last=1)  # leaves a deleted version behind in MLflow's tables
    other_bytes = make_artifact("default", other.user_id)
    registry.publish(other, other_bytes)
    registry.fetch(key, "candidate")  # warm the caches too

    receipt = registry.forget(key)
    assert (receipt.model_name, receipt.versions) == (key.model_name(registry.prefix), [4, 3])
    assert receipt.aliases == {"candidate": 4, "production": 3}
    assert len(receipt.objects) == 2

    needles = [key.model_name(registry.prefix), key.escaped_user, *shas]
    assert rows_mentioning(database_of(registry, request), needles) == []
    assert all(key.escaped_user not in k and not any(s in k for s in shas) for k, _ in registry.store.list())
    assert key not in list(registry.list_users("default"))
    assert registry.catalog.search_versions(f"name = '{key.model_name(registry.prefix)}'",
                                            order_by="version_number DESC", max_results=10)[0] == []
    assert registry.fetch(other, "candidate") == other_bytes
    assert registry.forget(key).versions == []  # idempotent


def _scan_is_clean(registry, request, key: UserKey) -> bool:
    """Nothing of `key` in any MLflow table, and no object of it (or naming it) in the store."""
    needles = [key.model_name(registry.prefix), key.escaped_user, key.user_id]
    stored = [(k, registry.store.get(k) or b"") for k, _ in registry.store.list()]
    return (rows_mentioning(database_of(registry, request), needles) == []
            and not any(n in k or n.encode() in body for k, body in stored for n in needles[1:])
            and registry.catalog.get_model(key.model_name(registry.prefix)) is None)


# Where a forget lands inside a publish: the call after which it runs.
LANDINGS = [("catalog", "create_model"), ("store", "put"), ("catalog", "create_version"), ("catalog", "set_alias")]


@pytest.mark.parametrize(("part", "call"), LANDINGS, ids=[c for _, c in LANDINGS])
def test_a_forget_landing_inside_a_publish_leaves_nothing_of_the_user(registry, request, monkeypatch, part, call):
    key = UserKey("default", f"Racer.{uuid.uuid4().hex[:8]}")
    registry.publish(key, make_artifact("default", key.user_id, data_fingerprint="before"))
    target, real = getattr(registry, part), getattr(getattr(registry, part), call)
    landed: list[bool] = []

    def then_forget(*args, **kwargs):
        result = real(*args, **kwargs)
        if not landed:
            landed.append(True)  # before the forget, whose own calls come through here too
            registry.forget(key)
        return result

    monkeypatch.setattr(target, call, then_forget)
    with pytest.raises(Forgotten, match="forgotten after this publish began"):
        registry.publish(key, make_artifact("default", key.user_id, data_fingerprint="during"))
    monkeypatch.undo()
    assert landed and _scan_is_clean(registry, request, key)
    assert fsck(registry).clean


def test_a_job_started_before_a_forget_publishes_nothing_of_the_user_and_a_later_one_may(registry, request):
    key = UserKey("default", f"Late.{uuid.uuid4().hex[:8]}")
    bystander = UserKey("default", f"stays-{uuid.uuid4().hex[:8]}")
    registry.publish(key, make_artifact("default", key.user_id, data_fingerprint="old"))
    job_start = registry.erasure_snapshot(["default"])
    registry.forget(key)
    assert registry.forgotten_since(key, job_start) and not registry.forgotten_since(bystander, job_start)
    with pytest.raises(Forgotten):
        registry.publish(key, make_artifact("default", key.user_id, data_fingerprint="new"), erasures=job_start)
    assert _scan_is_clean(registry, request, key)
    assert registry.publish(bystander, make_artifact("default", bystander.user_id), erasures=job_start).version == 1
    with pytest.raises(ValueError, match="does not cover namespace 'other'"):
        registry.publish(UserKey("other", "x"), make_artifact("other", "x"), erasures=job_start)

    later_job = registry.erasure_snapshot(["default"])
    assert not registry.forgotten_since(key, later_job)
    assert registry.publish(key, make_artifact("default", key.user_id, data_fingerprint="new"),
                            erasures=later_job).version == 1
    registry.forget(key)  # forgotten again: the later job's own snapshot now refuses too
    with pytest.raises(Forgotten):
        registry.publish(key, make_artifact("default", key.user_id, data_fingerprint="newer"), erasures=later_job)
    assert _scan_is_clean(registry, request, key)


def test_tombstones_and_pseudonyms_hold_no_id_and_fsck_knows_them(registry, request):
    key, other = UserKey("default", f"Ghost.{uuid.uuid4().hex[:8]}"), UserKey("default", "ghost-2")
    assert registry.pseudonym(key) == registry.pseudonym(key) != registry.pseudonym(other)
    registry.forget(key)
    registry.forget(key)  # each forget is its own tombstone
    tombstones = [k for k, _ in registry.store.list() if "/_erasure/forgotten/" in k]
    assert len(tombstones) == 2 and len({t.rsplit("/", 1)[0] for t in tombstones}) == 1
    assert registry.pseudonym(key)[2:] not in tombstones[0]
    assert _scan_is_clean(registry, request, key)
    assert fsck(registry).clean
    with Registry(registry.tracking_uri, registry.store_uri, s3_endpoint_url=registry.s3_endpoint_url,
                  model_prefix=registry.prefix) as elsewhere:  # another process agrees on the names
        assert elsewhere.pseudonym(key) == registry.pseudonym(key)
        assert elsewhere.forgotten_since(key, ErasureSnapshot(frozenset({"default"}), frozenset(tombstones[:1])))
