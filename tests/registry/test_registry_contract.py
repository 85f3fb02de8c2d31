"""The registry contract, run on sqlite and PostgreSQL, each in-process and behind a real mlflow
server (artifacts in files for sqlite in-process, else in S3)."""
from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from prefixfleet.registry import (
    IntegrityError,
    NotFound,
    Registry,
    RegistryError,
    UserKey,
    VersionRef,
    gc,
)
from tests.fixtures.artifacts import DEFAULT_SPEC, make_artifact

ALICE = UserKey("default", "alice")
GET_JSON_FIELDS = {"namespace", "user_id", "version", "alias", "sha256", "size_bytes", "uri",
                   "backbone_fingerprint", "data_fingerprint", "spec", "metrics"}


def publish(reg: Registry, key: UserKey = ALICE, data: str = "data-1", **kwargs) -> VersionRef:
    artifact_kwargs = {k: kwargs.pop(k) for k in ("spec", "backbone_fingerprint", "seed") if k in kwargs}
    artifact = make_artifact(key.namespace, key.user_id, data_fingerprint=data, **artifact_kwargs)
    return reg.publish(key, artifact, **kwargs)


def test_publish_records_everything_and_fetch_returns_the_same_bytes(registry):
    artifact = make_artifact("default", "alice", data_fingerprint="d1", backbone_fingerprint="bb")
    ref = registry.publish(ALICE, artifact, metrics={"eval_loss": 1.25, "baseline_eval_loss": 2.5},
                           run_id="run-7", tags={"source": "test"})
    assert (ref.namespace, ref.user_id, ref.version, ref.aliases) == ("default", "alice", 1, ["candidate"])
    assert (ref.size_bytes, ref.backbone_fingerprint, ref.data_fingerprint) == (len(artifact), "bb", "d1")
    assert ref.spec == DEFAULT_SPEC and ref.metrics == {"eval_loss": 1.25, "baseline_eval_loss": 2.5}
    assert (ref.run_id, ref.tags) == ("run-7", {"source": "test"})
    assert ref.uri.endswith(f"/default/{ALICE.shard}/alice/{ref.sha256}.safetensors")
    resolved = registry.resolve(ALICE, "candidate")
    assert (resolved.version, resolved.sha256, resolved.alias) == (1, ref.sha256, "candidate")
    assert registry.fetch(ALICE, "candidate") == artifact
    assert registry.fetch(ALICE, version=1) == artifact
    payload = resolved.to_json()
    assert GET_JSON_FIELDS <= payload.keys()
    json.dumps(payload)


def test_a_version_names_its_job_run_in_mlflow_s_own_field(registry):
    """MLflow's UI links a version to its run through the version's run_id field."""
    publish(registry, run_id="0123456789abcdef0123456789abcdef")
    publish(registry, data="data-2")
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    name = ALICE.model_name(registry.prefix)
    assert client.get_model_version(name, "1").run_id == "0123456789abcdef0123456789abcdef"
    assert not client.get_model_version(name, "2").run_id


def test_unknown_user_alias_and_version_are_not_found_by_name(registry):
    with pytest.raises(NotFound, match="no prefix for user 'nobody' in namespace 'default'"):
        registry.resolve(UserKey("default", "nobody"))
    publish(registry)
    with pytest.raises(NotFound, match="no alias 'production' for user 'alice' in namespace 'default'"):
        registry.fetch(ALICE)
    with pytest.raises(NotFound, match="no version 9 for user 'alice' in namespace 'default'"):
        registry.resolve(ALICE, version=9)
    with pytest.raises(NotFound, match="user 'nobody'"):
        registry.history(UserKey("default", "nobody"))
    with pytest.raises(NotFound, match="version 9"):
        registry.promote(ALICE, 9)


def test_promote_rollback_and_history(registry):
    for data in ("d1", "d2", "d3"):
        publish(registry, data=data, metrics={"eval_loss": float(len(data))})
    registry.promote(ALICE, 1)
    assert registry.promote(ALICE, 3).version == 3
    assert registry.fetch(ALICE) == registry.fetch(ALICE, version=3)
    history = registry.history(ALICE)
    assert [(r.version, r.aliases) for r in history] == [(3, ["candidate", "production"]), (2, []), (1, [])]
    assert registry.rollback(ALICE).version == 1
    assert registry.resolve(ALICE).version == 1
    with pytest.raises(NotFound, match="no earlier production version for user 'alice'"):
        registry.rollback(ALICE)
    assert registry.promote(ALICE, 2, alias="staging").aliases == ["staging"]


def test_republishing_the_same_training_result_creates_nothing(registry):
    first = publish(registry, data="d1", seed=1)
    objects = sorted(registry.store.list())
    reordered_spec = dict(reversed(list(DEFAULT_SPEC.items())))
    again = publish(registry, data="d1", seed=2, spec=reordered_spec)  # new bytes, same identity
    assert (again.version, again.sha256) == (first.version, first.sha256)
    assert [r.version for r in registry.history(ALICE)] == [1]
    assert sorted(registry.store.list()) == objects
    assert publish(registry, data="d1", backbone_fingerprint="other").version == 2
    assert publish(registry, data="d2").version == 3


def test_find_answers_whether_a_training_result_is_published(registry):
    spec = json.dumps(DEFAULT_SPEC)
    assert registry.find(ALICE, data_fingerprint="d1", spec=spec, backbone_fingerprint="backbone-1") is None
    ref = publish(registry, data="d1")
    found = registry.find(ALICE, data_fingerprint="d1", spec=json.dumps(DEFAULT_SPEC, indent=1),
                          backbone_fingerprint="backbone-1")
    assert found is not None and (found.version, found.aliases) == (ref.version, ["candidate"])
    assert registry.find(ALICE, data_fingerprint="d2", spec=spec, backbone_fingerprint="backbone-1") is None


def test_publish_refuses_an_artifact_bound_to_someone_else_before_writing(registry):
    with pytest.raises(IntegrityError, match="belongs to user 'bob'"):
        registry.publish(ALICE, make_artifact("default", "bob"))
    with pytest.raises(IntegrityError, match="namespace 'other'"):
        registry.publish(ALICE, make_artifact("other", "alice"))
    with pytest.raises(IntegrityError):
        registry.publish(ALICE, make_artifact("default", "alice")[:-3])
    assert list(registry.store.list()) == [] and list(registry.models()) == []


def test_bad_aliases_metrics_and_tags_are_refused_before_writing(registry):
    for kwargs in ({"alias": "latest"}, {"alias": "v3"}, {"alias": "a b"},
                   {"metrics": {"bad name!": 1.0}}, {"tags": {"a/b": "x"}}):
        with pytest.raises(ValueError):
            publish(registry, **kwargs)
    assert list(registry.models()) == []


def test_publish_without_alias_and_non_finite_metrics(registry):
    ref = publish(registry, alias=None, metrics={"eval_loss": math.nan})
    assert ref.aliases == [] and math.isnan(ref.metrics["eval_loss"])
    assert ref.to_json()["metrics"] == {"eval_loss": None}
    with pytest.raises(NotFound):
        registry.resolve(ALICE, "candidate")


def test_list_users_streams_pages_and_keeps_namespaces_apart(registry, monkeypatch):
    monkeypatch.setattr("prefixfleet.registry.catalog.rest.PAGE_MAX_MODELS", 2)
    monkeypatch.setattr("prefixfleet.registry.catalog.sql.PAGE_MAX_MODELS", 2)
    for ns, user in [("a_b", "u1"), ("a_b", "u2"), ("a_b", "u3"), ("axb", "u4"), ("a_bc", "u5"), ("zz", "u1")]:
        publish(registry, UserKey(ns, user))
    users = registry.list_users("a_b")
    assert iter(users) is users  # a generator, not one giant list
    assert list(users) == [UserKey("a_b", f"u{i}") for i in (1, 2, 3)]
    assert list(registry.list_users("axb")) == [UserKey("axb", "u4")]
    assert list(registry.list_users("empty")) == []


def test_gc_keeps_the_newest_and_every_aliased_version(registry):
    refs = [publish(registry, data=f"d{i}") for i in range(1, 6)]
    registry.promote(ALICE, 1)
    removed = gc(registry, ALICE, keep_last=2)
    assert sorted(r.version for r in removed) == [2, 3]
    assert [r.version for r in registry.history(ALICE)] == [5, 4, 1]
    kept = {k.rsplit("/", 1)[1] for k, _ in registry.store.list()}
    assert kept == {f"{refs[i].sha256}.safetensors" for i in (0, 3, 4)}
    with pytest.raises(NotFound):
        registry.fetch(ALICE, version=2)
    assert registry.fetch(ALICE) == registry.fetch(ALICE, version=1)
    assert [r.version for r in gc(registry, None, keep_last=0)] == [4]
    assert [r.version for r in registry.history(ALICE)] == [5, 1]


def test_gc_of_the_whole_registry_reads_versions_only_of_users_with_more_than_keep_last(registry, monkeypatch):
    bob, carol = UserKey("default", "bob"), UserKey("default", "carol")
    for i in range(1, 4):
        publish(registry, ALICE, data=f"a{i}")
        publish(registry, carol, data=f"c{i}")
    for i in range(1, 3):
        publish(registry, bob, data=f"b{i}")
    registry.catalog.delete_version(carol.model_name(registry.prefix), 2)  # newest is 3, 2 live
    searched: list[str] = []
    search = registry.catalog.search_versions
    monkeypatch.setattr(registry.catalog, "search_versions",
                        lambda filter_string, **kw: searched.append(filter_string) or search(filter_string, **kw))
    removed = gc(registry, None, keep_last=2)
    assert [(r.user_id, r.version) for r in removed] == [("alice", 1)]
    assert "bob" not in " ".join(searched) and "alice" in " ".join(searched)  # bob's newest is version 2
    assert [r.version for r in registry.history(carol)] == [3, 1]
    assert [r.version for r in registry.history(bob)] == [2, 1]


def reader_of_two_versions(registry: Registry, resolve_ttl: float) -> Registry:
    """Alice with versions 1 (production) and 2, and a second registry reading them."""
    publish(registry, data="d1")
    publish(registry, data="d2")
    registry.promote(ALICE, 1)
    return Registry(registry.tracking_uri, registry.store_uri, s3_endpoint_url=registry.s3_endpoint_url,
                    model_prefix=registry.prefix, resolve_ttl=resolve_ttl)


def test_own_writes_are_seen_at_once_and_other_writers_within_twice_the_ttl(registry):
    with reader_of_two_versions(registry, resolve_ttl=0.2) as reader:
        assert registry.resolve(ALICE).version == reader.resolve(ALICE).version == 1
        registry.promote(ALICE, 2)
        assert registry.resolve(ALICE).version == 2
        time.sleep(0.45)
        assert reader.resolve(ALICE).version == 2


def test_a_fresh_resolve_sees_another_writer_at_once(registry):
    with reader_of_two_versions(registry, resolve_ttl=600) as reader:
        assert reader.resolve(ALICE).version == 1  # now cached for ten minutes
        registry.promote(ALICE, 2)
        assert reader.resolve(ALICE).version == 1
        assert reader.resolve(ALICE, fresh=True).version == 2
        assert reader.resolve(ALICE).version == 2  # the fresh read refreshed the cache


def test_warm_fetches_are_served_from_memory(registry, monkeypatch):
    artifact = make_artifact("default", "alice")
    registry.promote(ALICE, registry.publish(ALICE, artifact).version)
    assert registry.fetch(ALICE) == artifact
    monkeypatch.setattr(registry.store, "get", lambda key: pytest.fail("store read on a warm fetch"))
    monkeypatch.setattr(registry.catalog, "get_version_by_alias",
                        lambda *a: pytest.fail("MLflow read on a warm resolve"))
    assert registry.fetch(ALICE) == artifact


def test_configuration_errors_are_registry_errors(tmp_path):
    with pytest.raises(RegistryError, match="unsupported MLflow tracking URI"):
        Registry("file:///nowhere/mlruns", tmp_path.as_uri())


def test_from_env_defaults_to_sqlite_and_files_under_the_home(local_env):
    home = Path(local_env["PREFIXFLEET_HOME"])
    with Registry.from_env() as reg:
        assert (reg.tracking_uri, reg.store_uri) == (f"sqlite:///{home}/mlflow.db", (home / "store").as_uri())
        reg.publish(ALICE, make_artifact("default", "alice"))
        with reg.catalog.inner.store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL: no fsync per commit
    with sqlite3.connect(home / "mlflow.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # concurrent writers
    with Registry.from_env(home) as explicit:
        assert [k for k, _ in explicit.store.list()] == [ALICE.object_key(explicit.resolve(ALICE, "candidate").sha256)]
