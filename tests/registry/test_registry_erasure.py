"""Erasure (invariant 4): after forget, a scan of every MLflow table and of the whole object store
finds nothing of the user, and other users are untouched."""
from __future__ import annotations

import uuid

from prefixfleet.registry import UserKey, gc
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
