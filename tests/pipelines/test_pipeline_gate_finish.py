"""A trainer finishing the gate of a version an earlier job published: judged on the losses recorded
at publish while production is unchanged, against production re-evaluated once it changed, and
never re-promoting a version a rollback took production from. Real trainer, real embedded registry."""
from __future__ import annotations

import pytest

from prefixfleet.pipelines.training.actor import UserTrainer
from prefixfleet.pipelines.training.data import UserData
from prefixfleet.pipelines.training.plan import JobContext
from prefixfleet.pipelines.training.publisher import GATED_AGAINST
from prefixfleet.registry import Registry, UserKey
from prefixfleet.workers.artifact import ArtifactMeta, serialize
from prefixfleet.workers.data import data_fingerprint
from prefixfleet.workers.spec import PrefixSpec, TrainConfig
from prefixfleet.workers.trainer import UserRequest, evaluate, prepare, train_user
from tests.fixtures.backbones import TinyBackbones, examples_for
from tests.pipelines.pipeline_support import BACKBONE

ALICE = UserKey("default", "alice")
SPEC = PrefixSpec(num_virtual_tokens=4, reparam_hidden=32)
CONFIG = TrainConfig(steps=20, batch_size=4)
EXAMPLES = tuple(examples_for(2, 16))


@pytest.fixture
def trainer(local_env: dict, tiny_backbones: TinyBackbones):
    registry = Registry.from_env()
    trainer = UserTrainer(tiny_backbones.path(**BACKBONE), registry.address)
    yield trainer
    trainer.close()
    registry.close()


def publish(trainer: UserTrainer, tensors, *, data: str, metrics: dict, gated_against: str) -> int:
    meta = ArtifactMeta("default", "alice", SPEC, trainer.fingerprint(), data,
                        settings=CONFIG.settings_json(SPEC.method))
    return trainer.publisher.registry.publish(ALICE, serialize(tensors, meta), metrics=metrics, run_id="earlier-job",
                                    tags={GATED_AGAINST: gated_against}).version


def finish(trainer: UserTrainer, version: int):
    """This job's trainer meets alice's data again: its plan finds `version`, published from it."""
    outcome, = trainer.train_users([UserData(ALICE, list(EXAMPLES))], JobContext("this-job", "train", "bb", CONFIG, 8, SPEC))
    assert outcome.version == version
    return outcome


@pytest.fixture
def production(trainer: UserTrainer):
    """Version 1 in production: a real prefix for alice, trained on earlier data; its loss on the
    eval split of today's data."""
    request = UserRequest("alice", list(EXAMPLES), SPEC, CONFIG)
    result = train_user(trainer.backbone, request)
    version = publish(trainer, result.tensors, data="earlier-data", metrics={}, gated_against="none")
    trainer.publisher.registry.promote(ALICE, version)
    _, evals = prepare(trainer.backbone, request)
    loss, = evaluate(trainer.backbone, [(result.tensors, evals)])
    return version, result.tensors, loss


def test_unchanged_production_is_judged_on_the_recorded_losses(trainer, production):
    version, tensors, _ = production
    recorded = {"eval_loss": 1.0, "baseline_eval_loss": 9.0, "production_eval_loss": 2.0}
    candidate = publish(trainer, {k: v + 0.01 for k, v in tensors.items()},
                        data=data_fingerprint(EXAMPLES), metrics=recorded, gated_against=str(version))
    outcome = finish(trainer, candidate)
    assert outcome.promoted and outcome.production_eval_loss == 2.0 and "gate finished" in outcome.reason
    assert trainer.publisher.registry.resolve(ALICE, "production").version == candidate


def test_a_production_that_changed_since_publish_is_evaluated_again(trainer, production):
    version, tensors, production_loss = production
    # Judged on what was recorded (no production then) it would pass; production now beats it.
    recorded = {"eval_loss": production_loss + 1.0, "baseline_eval_loss": 99.0}
    candidate = publish(trainer, {k: v + 0.01 for k, v in tensors.items()}, data=data_fingerprint(EXAMPLES),
                        metrics=recorded, gated_against="none")
    outcome = finish(trainer, candidate)
    assert outcome.production_eval_loss == pytest.approx(production_loss, abs=1e-6)
    assert not outcome.promoted and "does not beat production" in outcome.reason
    assert trainer.publisher.registry.resolve(ALICE, "production").version == version


def test_a_version_taken_down_by_a_rollback_stays_down(trainer, production):
    version, tensors, _ = production
    recorded = {"eval_loss": 1.0, "baseline_eval_loss": 9.0, "production_eval_loss": 2.0}
    candidate = publish(trainer, {k: v + 0.01 for k, v in tensors.items()}, data=data_fingerprint(EXAMPLES),
                        metrics=recorded, gated_against=str(version))
    trainer.publisher.registry.promote(ALICE, candidate)
    trainer.publisher.registry.rollback(ALICE)
    outcome = finish(trainer, candidate)
    assert not outcome.promoted and "rollback" in outcome.reason
    assert trainer.publisher.registry.resolve(ALICE, "production").version == version
