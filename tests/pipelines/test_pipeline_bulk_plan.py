"""Planning in bulk: a chunk's users are decided from one search of registered models (the
published index), with the same decisions the per-user look-ups make, and a user whose index
cannot be trusted is looked up on its own."""
from __future__ import annotations

import json

import pytest

from prefixfleet.pipelines.training.data import UserData
from prefixfleet.pipelines.training.plan import JobContext, Planner, Skip, UserTask
from prefixfleet.registry import Registry, UserKey
from prefixfleet.registry.index import INDEX
from prefixfleet.workers.data import Example
from prefixfleet.workers.spec import PrefixSpec, TrainConfig
from tests.fixtures.artifacts import make_artifact
from tests.fixtures.counting import CountingCatalog

BACKBONE_FP = "backbone-bulk"
SPEC, CONFIG = PrefixSpec(), TrainConfig(steps=2)


def _user(i: int, text: str = "hello") -> UserData:
    return UserData(UserKey("bulk", f"u{i}"), [Example(text=f"{text} {i} {j}") for j in range(4)])


def _publish(registry: Registry, user: UserData, *, promote: bool, run_id: str = "job-1") -> int:
    artifact = make_artifact("bulk", user.key.user_id, data_fingerprint=user.fingerprint,
                             spec=json.loads(SPEC.to_json()), backbone_fingerprint=BACKBONE_FP,
                             settings=CONFIG.settings_json(SPEC.method))
    ref = registry.publish(user.key, artifact, run_id=run_id)
    if promote:
        registry.promote(user.key, ref.version)
    return ref.version


def _context(kind: str) -> JobContext:
    return JobContext("job-2", kind, "backbone", CONFIG, 8, SPEC)


@pytest.fixture
def published_users(registry: Registry) -> list[UserData]:
    """u0–u2 in production from this data, u3 published but never promoted, u4–u5 new."""
    users = [_user(i) for i in range(6)]
    for user in users[:3]:
        _publish(registry, user, promote=True)
    _publish(registry, users[3], promote=False)
    return users


def _plan(registry: Registry, users: list[UserData], kind: str, *, bulk: bool = True):
    counting = CountingCatalog(registry.catalog)
    registry.catalog = counting
    planner = Planner(registry, BACKBONE_FP)
    published = planner.lookup(users) if bulk else {}
    decisions = [planner.decide(u, _context(kind), published.get(u.key)) for u in users]
    registry.catalog = counting.inner
    return decisions, counting.calls


def _summary(decisions: list) -> list[tuple]:
    return [(type(d).__name__, d.reason, getattr(d, "version", None), getattr(d, "existing", None))
            for d in decisions]


@pytest.mark.parametrize("kind", ["train", "retrain"])
def test_a_chunk_is_planned_from_one_search_with_the_per_user_decisions(
        registry: Registry, published_users: list[UserData], kind: str) -> None:
    bulk, calls = _plan(registry, published_users, kind)
    assert calls == {"search_models": 1}
    one_by_one, slow_calls = _plan(registry, published_users, kind, bulk=False)
    assert _summary(bulk) == _summary(one_by_one)
    assert sum(slow_calls.values()) >= len(published_users)

    assert all(isinstance(d, Skip) for d in bulk[:3])
    assert isinstance(bulk[3], UserTask) and bulk[3].existing == 1
    assert all(isinstance(d, UserTask) and d.existing is None for d in bulk[4:])


def test_changed_data_is_trained_and_a_stale_index_is_not_believed(
        registry: Registry, published_users: list[UserData]) -> None:
    changed = [_user(0, "changed"), _user(1, "changed"), published_users[2]]
    # u1's newest version has an index written after another version than the one below it, and
    # it claims production was trained on the new data
    claim = [[1, "", changed[1].fingerprint, BACKBONE_FP, "job-1"]]
    model = registry.catalog.get_model(changed[1].key.model_name(registry.prefix))
    registry.catalog.set_version_tag(model.name, model.latest, INDEX,
                                     json.dumps({"after": 99, "complete": True, "versions": claim}))

    decisions, calls = _plan(registry, changed, "retrain")
    for decision in decisions[:2]:
        assert isinstance(decision, UserTask) and decision.warm_start == 1
        assert decision.reason == "data changed since production version 1"
    assert isinstance(decisions[2], Skip)
    assert calls["search_models"] == 1 and calls["get_version_by_alias"] == 2  # the two to train (their spec)
