"""Storage isolation (invariant 2): bytes come back only when sha256, namespace and user all match;
a wrong, corrupted or truncated artifact is refused with IntegrityError, never replaced by another."""
from __future__ import annotations

import dataclasses

import pytest

from prefixfleet.registry import IntegrityError, NotFound, UserKey
from prefixfleet.registry.refs import SHA256, SIZE
from tests.fixtures.artifacts import make_artifact
from tests.fixtures.tamper import database_of, overwrite, set_version_source, set_version_tag

ALICE, BOB = UserKey("default", "alice"), UserKey("default", "bob")


@pytest.fixture
def published(registry):
    refs = {}
    for key in (ALICE, BOB):
        ref = registry.publish(key, make_artifact(key.namespace, key.user_id, seed=len(key.user_id)))
        refs[key] = registry.promote(key, ref.version)
    return refs


def _refused(registry, key=ALICE):
    registry.invalidate(key)
    with pytest.raises(IntegrityError):
        registry.fetch(key)


def test_another_users_bytes_under_a_users_key_are_refused(registry, published):
    bob_bytes = registry.fetch(BOB)
    overwrite(registry.store, ALICE.object_key(published[ALICE].sha256), bob_bytes)
    _refused(registry)


def test_another_users_artifact_with_a_matching_record_is_refused_by_its_header(registry, published, request):
    """Even when the MLflow record is rewritten to the other artifact's sha256, size and a location
    in the user's own folder, and that artifact is copied there, its header names the other user."""
    bob = published[BOB]
    name, version = ALICE.model_name(registry.prefix), published[ALICE].version
    planted = ALICE.object_key(bob.sha256)
    set_version_tag(registry, name, version, SHA256, bob.sha256)
    set_version_tag(registry, name, version, SIZE, str(bob.size_bytes))
    set_version_source(database_of(registry, request), name, version, registry.store.uri_for(planted))
    overwrite(registry.store, planted, registry.fetch(BOB))
    registry.invalidate(ALICE)
    with pytest.raises(IntegrityError, match="belongs to user 'bob'"):
        registry.fetch(ALICE)


def test_a_flipped_byte_is_refused(registry, published):
    key = ALICE.object_key(published[ALICE].sha256)
    data = bytearray(registry.store.get(key))
    data[len(data) // 2] ^= 0x01
    overwrite(registry.store, key, bytes(data))
    _refused(registry)


def test_a_truncated_artifact_is_refused(registry, published):
    key = ALICE.object_key(published[ALICE].sha256)
    overwrite(registry.store, key, registry.store.get(key)[:-16])
    _refused(registry)


def test_a_missing_artifact_is_refused(registry, published):
    registry.store.delete(ALICE.object_key(published[ALICE].sha256))
    _refused(registry)


def test_forged_references_never_read_another_users_storage(registry, published):
    alice, bob = published[ALICE], published[BOB]
    with pytest.raises(IntegrityError, match="outside the user's storage"):
        registry.fetch_ref(dataclasses.replace(alice, uri=bob.uri))
    with pytest.raises(IntegrityError, match="missing"):
        planted_uri = registry.store.uri_for(ALICE.object_key(bob.sha256))
        registry.fetch_ref(dataclasses.replace(alice, sha256=bob.sha256, uri=planted_uri))
    assert registry.fetch(BOB) == registry.fetch_ref(bob)


def test_namespaces_never_see_each_others_users(registry):
    a, b = UserKey("team-a", "alice"), UserKey("team-b", "alice")
    registry.promote(a, registry.publish(a, make_artifact("team-a", "alice", seed=1)).version)
    assert list(registry.list_users("team-b")) == []
    with pytest.raises(NotFound, match="no prefix for user 'alice' in namespace 'team-b'"):
        registry.resolve(b)
    registry.promote(b, registry.publish(b, make_artifact("team-b", "alice", seed=2)).version)
    assert registry.resolve(a).sha256 != registry.resolve(b).sha256
    assert registry.fetch(a) != registry.fetch(b)
    assert [k.namespace for k in registry.list_users("team-a")] == ["team-a"]
    before = registry.fetch(a)
    registry.forget(b)
    registry.invalidate(a)
    assert registry.fetch(a) == before
