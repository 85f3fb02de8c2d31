"""fsck finds each planted fault; --repair fixes the repairable ones and leaves a clean registry."""
from __future__ import annotations

import hashlib

import pytest

from prefixfleet.registry import UserKey, fsck
from prefixfleet.registry.refs import model_tags
from tests.fixtures.artifacts import make_artifact
from tests.fixtures.tamper import add_dangling_alias, database_of, overwrite

USERS = {name: UserKey("default", name) for name in ("ok", "orphan", "missing", "corrupt", "twin", "dangling")}


def _publish(registry, name, **kwargs):
    key = USERS[name]
    return registry.publish(key, make_artifact("default", key.user_id, **kwargs))


def test_fsck_finds_and_repairs_planted_faults(registry, request):
    healthy = _publish(registry, "ok")
    orphan_bytes = make_artifact("default", "orphan")
    orphan_key = USERS["orphan"].object_key(hashlib.sha256(orphan_bytes).hexdigest())
    registry.store.put(orphan_key, orphan_bytes)
    missing = _publish(registry, "missing")
    registry.store.delete(USERS["missing"].object_key(missing.sha256))
    corrupt = _publish(registry, "corrupt")
    data = bytearray(registry.store.get(USERS["corrupt"].object_key(corrupt.sha256)))
    data[-1] ^= 0xFF
    overwrite(registry.store, USERS["corrupt"].object_key(corrupt.sha256), bytes(data))
    twin = _publish(registry, "twin", data_fingerprint="same", seed=1)
    name = USERS["twin"].model_name(registry.prefix)  # a racing retry that crashed before cleaning up
    registry.catalog.create_version(name, twin.uri, registry.catalog.get_version(name, 1).tags)
    _publish(registry, "dangling")
    add_dangling_alias(database_of(registry, request), USERS["dangling"].model_name(registry.prefix), "production", 7)
    registry.store.put("notes/readme.txt", b"not a registry object")

    report = fsck(registry, grace_s=0)
    found = sorted((f.kind, f.user_id, f.version) for f in report.faults)
    assert found == [
        ("dangling_alias", "dangling", 7), ("duplicate_version", "twin", 2), ("hash_mismatch", "corrupt", 1),
        ("missing_artifact", "missing", 1), ("orphan_artifact", "orphan", None), ("stray_object", None, None),
    ]
    assert (report.users, report.versions, report.objects) == (5, 6, 6) and not report.clean
    assert not any(f.repaired for f in report.faults)

    repaired = fsck(registry, repair=True, grace_s=0)
    assert all(f.repaired for f in repaired.faults if f.kind != "stray_object")
    after = fsck(registry, grace_s=0)
    assert [f.kind for f in after.faults] == ["stray_object"]
    assert registry.store.get(orphan_key) is None
    assert [r.version for r in registry.history(USERS["twin"])] == [1]
    assert registry.catalog.get_model(USERS["dangling"].model_name(registry.prefix)).aliases == {"candidate": 1}
    assert registry.history(USERS["missing"]) == [] and registry.history(USERS["corrupt"]) == []
    assert registry.fetch(USERS["ok"], "candidate") == registry.fetch_ref(healthy)


def test_fsck_of_a_healthy_registry_is_clean(registry):
    for name in ("ok", "twin"):
        _publish(registry, name)
    registry.catalog.create_model(USERS["orphan"].model_name(registry.prefix), model_tags(USERS["orphan"]))
    report = fsck(registry)
    assert report.clean and report.faults == [] and (report.users, report.versions, report.objects) == (3, 2, 2)
    assert report.to_json()["clean"] is True


def test_repair_leaves_an_artifact_whose_publish_may_be_in_flight_alone(registry):
    """A publish writes its artifact, then creates its version: until the grace period has passed
    an unreferenced artifact is a publish in flight, not an orphan."""
    data = make_artifact("default", "orphan")
    object_key = USERS["orphan"].object_key(hashlib.sha256(data).hexdigest())
    registry.store.put(object_key, data)
    report = fsck(registry, repair=True)
    assert report.faults == [] and report.in_flight == [registry.store.uri_for(object_key)] and report.clean
    assert registry.store.get(object_key) == data
    ref = registry.publish(USERS["orphan"], data)  # the publish completes: nothing was lost
    assert registry.fetch_ref(ref) == data and fsck(registry, grace_s=0).faults == []
    with pytest.raises(ValueError, match="grace_s"):
        fsck(registry, grace_s=-1)
