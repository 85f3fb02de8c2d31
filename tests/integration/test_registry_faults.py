"""The registry through flaky servers: a fault proxy in front of the real `mlflow server` and the
real S3-compatible server answers a share of requests with a 503, resets the connection before
the request reaches the server, or loses the response after the write took effect. Every user is
published exactly once, lost answers are recognised as success, and an outage ends in a clear
error with nothing written."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from prefixfleet.registry import Registry, Unavailable, UserKey, fsck
from prefixfleet.registry.forgetting import NOT_STARTED, forget_all
from tests.fixtures.artifacts import make_artifact
from tests.fixtures.faults import FaultProxy
from tests.fixtures.servers import make_server_registry

pytestmark = pytest.mark.servers
USERS = 24


@pytest.fixture
def faulty(mlflow_server_uri: str, s3_endpoint: str, s3_bucket: str) -> Iterator[Callable[..., tuple]]:
    """`faulty(mlflow={...}, s3={...})`: (registry through the proxies, the same registry direct,
    the MLflow proxy, the S3 proxy); the dicts configure each proxy."""
    opened: list = []

    def make(mlflow: dict | None = None, s3: dict | None = None) -> tuple[Registry, Registry, FaultProxy, FaultProxy]:
        mp = FaultProxy(mlflow_server_uri, **(mlflow or {})).__enter__()
        sp = FaultProxy(s3_endpoint, **(s3 or {})).__enter__()
        reg = make_server_registry(mp.url, sp.url, s3_bucket)
        direct = Registry(mlflow_server_uri, reg.store_uri, s3_endpoint_url=s3_endpoint, model_prefix=reg.prefix)
        opened.extend([reg, direct, mp, sp])
        return reg, direct, mp, sp

    yield make
    for item in opened:
        item.close() if isinstance(item, Registry) else item.stop()


def test_every_user_is_published_and_promoted_exactly_once_under_20_percent_faults(faulty) -> None:
    reg, direct, mlflow, s3 = faulty(mlflow={"rate": 0.2, "seed": 11}, s3={"rate": 0.2, "seed": 12})
    artifacts = {UserKey("default", f"u{i}"): make_artifact("default", f"u{i}", seed=i) for i in range(USERS)}
    for key, data in artifacts.items():
        ref = reg.publish(key, data, metrics={"eval_loss": 1.0})
        reg.promote(key, ref.version)
        assert reg.fetch(key, "production") == data
    for key, data in artifacts.items():
        history = direct.history(key)
        assert [(r.version, r.aliases) for r in history] == [(1, ["candidate", "production"])], key
        assert direct.fetch(key, "production") == data
    assert fsck(direct, grace_s=0).faults == []
    # the faults really happened, of every kind, and were retried
    assert {"503", "reset", "lost"} <= set(mlflow.counts) and mlflow.faulted >= 50 and s3.faulted >= 3
    assert sum(reg.catalog.retries.values()) >= mlflow.faulted - 5


def test_a_create_version_whose_answer_was_lost_leaves_one_version(faulty) -> None:
    create = lambda method, path: method == "POST" and "model-versions/create" in path  # noqa: E731
    reg, direct, mlflow, _ = faulty(mlflow={"rate": 1.0, "faults": ["lost"], "only": create, "limit": 2})
    key = UserKey("default", "lost-create")
    ref = reg.publish(key, make_artifact("default", "lost-create"))
    assert mlflow.counts["lost"] == 2  # two versions were created whose answers never came back
    assert [(r.version, r.aliases) for r in direct.history(key)] == [(ref.version, ["candidate"])]


def test_an_s3_put_whose_answer_was_lost_is_success(faulty) -> None:
    put = lambda method, path: method == "PUT"  # noqa: E731
    reg, direct, _, s3 = faulty(s3={"rate": 1.0, "faults": ["lost"], "only": put, "limit": 1})
    key, data = UserKey("default", "lost-put"), make_artifact("default", "lost-put")
    reg.publish(key, data)
    assert s3.counts["lost"] == 1 and direct.fetch(key, "candidate") == data


def test_forget_finishes_when_the_answers_to_its_deletes_are_lost(faulty) -> None:
    delete = lambda method, path: method in ("DELETE", "POST") and "delete" in path.lower()  # noqa: E731
    reg, direct, mlflow, s3 = faulty(mlflow={"rate": 1.0, "faults": ["lost"], "only": delete, "limit": 1},
                                     s3={"rate": 1.0, "faults": ["lost"], "only": delete, "limit": 1})
    key = UserKey("default", "lost-delete")
    reg.publish(key, make_artifact("default", "lost-delete"))
    receipt = reg.forget(key)
    assert receipt.versions == [1] and len(receipt.objects) == 1
    assert mlflow.counts["lost"] == 1 and s3.counts["lost"] == 1
    assert list(direct.store.list(key.object_dir)) == [] and direct.catalog.get_model(key.model_name(reg.prefix)) is None


def test_an_mlflow_outage_past_the_deadline_is_a_clear_error_and_writes_nothing(faulty, monkeypatch) -> None:
    monkeypatch.setenv("PREFIXFLEET_RETRY_DEADLINE_S", "1")
    reg, direct, mlflow, s3 = faulty()
    key = UserKey("default", "outage")
    with mlflow.outage(), pytest.raises(Unavailable, match=r"MLflow unreachable: create_model failed \d+ times in 1\.\d s"):
        reg.publish(key, make_artifact("default", "outage"))
    assert mlflow.counts["outage"] >= 3 and list(direct.store.list(key.object_dir)) == []
    assert direct.catalog.get_model(key.model_name(reg.prefix)) is None


def test_an_s3_outage_past_the_deadline_names_s3_and_leaves_no_version(faulty, monkeypatch) -> None:
    monkeypatch.setenv("PREFIXFLEET_RETRY_DEADLINE_S", "1")
    reg, direct, _, s3 = faulty()
    key = UserKey("default", "s3-outage")
    with s3.outage(), pytest.raises(Unavailable, match=r"S3 unreachable: get failed \d+ times"):
        reg.publish(key, make_artifact("default", "s3-outage"))  # its first call reads the tombstones
    assert s3.counts["outage"] >= 2
    assert direct.catalog.get_model(key.model_name(reg.prefix)) is None


def test_forgetting_many_users_under_faults_erases_each_and_an_outage_is_finished_by_a_rerun(faulty, monkeypatch):
    monkeypatch.setenv("PREFIXFLEET_RETRY_DEADLINE_S", "1")
    reg, direct, mlflow, s3 = faulty(mlflow={"rate": 0.2, "seed": 21}, s3={"rate": 0.2, "seed": 22})
    keys = [UserKey("default", f"bulk-{i}") for i in range(USERS)]
    for i, key in enumerate(keys):
        direct.publish(key, make_artifact("default", key.user_id, seed=i), promote=True)

    results, forgets = [], forget_all(reg, keys, workers=2)
    for result in forgets:  # the MLflow server goes away after the first few receipts
        results.append(result)
        if len(results) == 4:
            with mlflow.outage():
                results.extend(forgets)
    assert [r.key for r in results] == keys
    failed = [r for r in results if not r.ok]
    assert failed and all("MLflow unreachable" in r.error for r in failed)
    assert any(r.error.startswith(NOT_STARTED) for r in failed)  # no more forgets began once it showed

    again = list(forget_all(reg, [r.key for r in failed], workers=2))  # the server is back
    assert all(r.ok for r in again), [r.error for r in again if not r.ok]
    assert list(direct.list_users("default")) == [] and fsck(direct, grace_s=0).faults == []
    assert not [k for k, _ in direct.store.list() if "bulk-" in k]
    assert mlflow.faulted >= 5
