"""Forgetting many users at once (`forget_all`, behind `forget --users-file`): every user erased
as a single forget erases it, receipts in input order, failures named and kept apart."""
from __future__ import annotations

import uuid

import pytest

from prefixfleet.registry import Registry, RegistryError, Unavailable, UserKey
from prefixfleet.registry.forgetting import NOT_STARTED, forget_all
from tests.fixtures.artifacts import make_artifact
from tests.fixtures.tamper import database_of, rows_mentioning


def _publish(registry: Registry, users: int, tag: str) -> list[UserKey]:
    keys = [UserKey("default", f"{tag}-{i:03d}") for i in range(users)]
    for i, key in enumerate(keys):
        registry.publish(key, make_artifact("default", key.user_id, seed=i), metrics={"eval_loss": 1.0},
                         alias="candidate", promote=True)
    return keys


def test_forget_all_erases_every_user_and_leaves_the_others(registry, request):
    tag = uuid.uuid4().hex[:8]
    keys = _publish(registry, 24, f"gone-{tag}")
    kept, = _publish(registry, 1, f"kept-{tag}")
    unknown = UserKey("default", f"never-{tag}")
    asked = [*keys[:12], unknown, *keys[12:]]

    results = list(forget_all(registry, asked, workers=4))
    assert [r.key for r in results] == asked  # in input order, whatever finished first
    assert all(r.ok for r in results)
    by_key = {r.key: r.receipt for r in results}
    assert all(by_key[k].versions == [1] and by_key[k].aliases == {"candidate": 1, "production": 1}
               and len(by_key[k].objects) == 1 for k in keys)
    assert by_key[unknown].versions == [] and by_key[unknown].model_name is None

    needles = [n for k in keys for n in (k.model_name(registry.prefix), k.escaped_user)]
    assert rows_mentioning(database_of(registry, request), needles) == []
    assert not [k for k, _ in registry.store.list() if any(key.escaped_user in k for key in keys)]
    assert list(registry.list_users("default")) == [kept]
    assert registry.resolve(kept, "production").version == 1


def test_a_failing_forget_is_reported_and_an_outage_stops_the_rest(local_registry, monkeypatch):
    """Unit test of the error paths: `Registry.forget` fails on purpose for two users."""
    keys = [UserKey("default", f"u{i}") for i in range(40)]
    real = local_registry.forget

    def forget(key: UserKey):
        if key.user_id == "u3":
            raise RegistryError("MLflow refused the delete")
        if key.user_id == "u5":
            raise Unavailable("MLflow unreachable for 180 s")
        return real(key)

    monkeypatch.setattr(local_registry, "forget", forget)
    results = list(forget_all(local_registry, keys, workers=1))
    assert [r.key for r in results] == keys
    assert (results[3].ok, results[3].error) == (False, "MLflow refused the delete")
    assert (results[5].ok, results[5].error) == (False, "MLflow unreachable for 180 s")
    started = [r for r in results if not r.error.startswith(NOT_STARTED)]
    assert all(r.ok for r in started if r.key.user_id not in ("u3", "u5"))
    assert len(started) < len(keys)  # once the outage shows, no more forgets start
    assert all(r.error == f"{NOT_STARTED}MLflow unreachable for 180 s" for r in results[len(started):])
    with pytest.raises(ValueError, match="workers"):
        list(forget_all(local_registry, keys, workers=0))
