"""The trainer actor: loads the frozen backbone once, then trains, gates and publishes many users.

Actors publish their users themselves rather than returning artifacts to the driver: publish
throughput grows with the number of actors, artifact bytes never cross the cluster twice, and the
driver stays a light scheduler at millions of users. Publishing runs on a small thread pool so
registry latency overlaps training. Exactly once: before training a chunk the actor looks each
user up by (data fingerprint, spec, training settings, backbone fingerprint); a chunk retried after a crash finishes
the users it had already published (including their promotion) instead of training them again,
and the registry's publish is itself idempotent on that identity.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

from prefixfleet.pipelines.gate import judge
from prefixfleet.pipelines.plan import UserTask
from prefixfleet.registry import NotFound, RegistryAddress, VersionRef
from prefixfleet.registry.errors import RegistryError
from prefixfleet.workers.artifact import ArtifactMeta, deserialize, serialize
from prefixfleet.workers.backbone import load_backbone, weights_checksum
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.prefix import PrefixTensors
from prefixfleet.workers.spec import TrainConfig
from prefixfleet.workers.trainer import UserJob, UserResult, evaluate, prepare, train_users

PUBLISH_THREADS = 4
GATED_AGAINST = "gated_against"  # version tag: the production version a candidate was judged against


@dataclass(frozen=True)
class JobContext:
    """What every chunk of one job shares."""

    run_id: str
    kind: str  # "train" | "retrain"
    backbone: str  # id or path, recorded in each artifact
    config: TrainConfig
    pack_size: int


@dataclass
class Outcome:
    """What happened to one user."""

    namespace: str
    user_id: str
    status: str  # "trained" | "skipped" | "failed"
    version: int | None = None
    sha256: str | None = None
    eval_loss: float | None = None
    baseline_eval_loss: float | None = None
    production_eval_loss: float | None = None
    promoted: bool = False
    reason: str = ""
    loss_curve: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["loss_curve"]
        return out


def failed(task: UserTask, reason: str) -> Outcome:
    return Outcome(task.namespace, task.user_id, "failed", reason=reason)


class UserTrainer:
    """Plain class; `TrainerActor` below is its Ray actor. One instance per process."""

    def __init__(self, backbone: str, registry: RegistryAddress, device: str | None = None) -> None:
        self.backbone = load_backbone(backbone, device=device)
        self.checksum = weights_checksum(self.backbone.model)
        self.registry = registry.open()
        self.publisher = ThreadPoolExecutor(PUBLISH_THREADS, thread_name_prefix="publish")
        self.lock = threading.Lock()
        self.counts = {"pid": os.getpid(), "chunk_size": 0, "chunk_done": 0}

    def fingerprint(self) -> str:
        return self.backbone.fingerprint

    def close(self) -> None:
        """Wait for publishes in flight and release the registry (actors just end instead)."""
        self.publisher.shutdown(wait=True)
        self.registry.close()

    def unchanged(self) -> bool:
        """Invariant 6: the backbone's weights are bit-identical to when they were loaded."""
        return weights_checksum(self.backbone.model) == self.checksum

    @ray.method(concurrency_group="status")
    def status(self) -> dict[str, int]:
        """Answered while a chunk trains: pid and how far the current chunk is."""
        with self.lock:
            return dict(self.counts)

    def train(self, tasks: list[UserTask], context: JobContext) -> list[Outcome]:
        """Train, gate and publish a chunk of users; one outcome per task, in order."""
        with self.lock:
            self.counts.update(chunk_size=len(tasks), chunk_done=0)
        outcomes: dict[str, Outcome | Future[Outcome]] = {}
        jobs, production = [], {}
        for task in tasks:
            try:
                existing = self._existing(task, context)
                if existing is not None:
                    outcomes[task.label] = self._finish_gate(task, existing, context)
                    self._done()
                    continue
                job = self._job(task, context, start=self._warm_start(task))
                current = self._production(task)
                production[task.label] = (current, self._production_loss(current, job))
                jobs.append(job)
            except Exception as exc:  # noqa: BLE001 - one user's failure stays with that user
                outcomes[task.label] = failed(task, _reason(exc))
                self._done()
        by_label = {task.label: task for task in tasks}

        def on_result(result: UserResult) -> None:
            outcomes[result.user] = self.publisher.submit(
                self._publish, by_label[result.user], result, *production[result.user], context)

        train_users(self.backbone, jobs, pack_size=context.pack_size, on_result=on_result)
        return [_resolved(outcomes[task.label]) for task in tasks]

    def _done(self) -> None:
        with self.lock:
            self.counts["chunk_done"] += 1

    def _job(self, task: UserTask, context: JobContext, start: PrefixTensors | None = None) -> UserJob:
        return UserJob(task.label, task.train, task.spec, context.config, task.eval or None, start=start)

    def _existing(self, task: UserTask, context: JobContext) -> VersionRef | None:
        """The version the plan found for this task, or one this job published before a crash."""
        if task.existing is not None:
            return self.registry.resolve(task.key, version=task.existing)
        return self.registry.find(task.key, data_fingerprint=task.data_fingerprint, spec=task.spec.to_json(),
                                  backbone_fingerprint=self.fingerprint(),
                                  settings=context.config.settings_json(task.spec.method))

    def _tensors(self, ref: VersionRef) -> PrefixTensors:
        tensors, _ = deserialize(self.registry.fetch_ref(ref), backbone_fingerprint=self.fingerprint())
        return tensors

    def _warm_start(self, task: UserTask) -> PrefixTensors | None:
        if task.warm_start is None:
            return None
        return self._tensors(self.registry.resolve(task.key, version=task.warm_start))

    def _production(self, task: UserTask) -> VersionRef | None:
        """Production as it is now (not a cached resolution)."""
        try:
            return self.registry.resolve(task.key, "production", fresh=True)
        except NotFound:
            return None

    def _production_loss(self, production: VersionRef | None, job: UserJob) -> float | None:
        """Production's eval loss on this job's eval split (None: no production on this backbone)."""
        if production is None or production.backbone_fingerprint != self.fingerprint():
            return None
        _, evals = prepare(self.backbone, job)
        loss, = evaluate(self.backbone, [(self._tensors(production), evals)])
        return loss

    def _publish(self, task: UserTask, result: UserResult, production: VersionRef | None,
                 production_loss: float | None, context: JobContext) -> Outcome:
        try:
            if not result.ok:
                return failed(task, result.error or "training failed")
            verdict = judge(result.eval_loss, result.baseline_eval_loss, production_loss)
            meta = ArtifactMeta(task.namespace, task.user_id, task.spec, self.fingerprint(), task.data_fingerprint,
                                backbone=context.backbone, settings=context.config.settings_json(task.spec.method))
            metrics = result.metrics()
            if production_loss is not None:
                metrics["production_eval_loss"] = production_loss
            ref = self.registry.publish(task.key, serialize(result.tensors, meta), metrics=metrics,
                                        run_id=context.run_id, alias="candidate",
                                        tags={"job": context.kind, "reason": task.reason,
                                              GATED_AGAINST: _version_label(production)})
            if verdict.promote:
                self.registry.promote(task.key, ref.version)
            return Outcome(task.namespace, task.user_id, "trained", ref.version, ref.sha256, result.eval_loss,
                           result.baseline_eval_loss, production_loss, verdict.promote, verdict.reason,
                           result.loss_curve)
        except Exception as exc:  # noqa: BLE001 - one user's failure stays with that user
            return failed(task, _reason(exc))
        finally:
            self._done()

    def _finish_gate(self, task: UserTask, ref: VersionRef, context: JobContext) -> Outcome:
        """A version already trained from this task's data, spec and settings: by this job before a
        crash, or by an earlier job that may have stopped between publish and promote. Its gate is
        judged against production as it is now: on the losses recorded at publish while production
        is the one it was measured against, else on production re-evaluated on this eval split.
        A version a rollback took production from is not promoted again."""
        m = ref.metrics
        mine = ref.run_id == context.run_id
        outcome = Outcome(ref.namespace, ref.user_id, "trained" if mine else "skipped", ref.version, ref.sha256,
                          m.get("eval_loss"), m.get("baseline_eval_loss"))
        production = self._production(task)
        earlier = f"already published as version {ref.version}"
        if production is not None and production.version == ref.version:
            outcome.promoted, outcome.reason = mine, f"{earlier}, in production"
            return outcome
        if ref.version in self.registry.rolled_back(task.key):
            outcome.reason = f"{earlier}; a rollback took production from it, so it stays down"
            return outcome
        if ref.tags.get(GATED_AGAINST) == _version_label(production):
            production_loss = m.get("production_eval_loss")
        else:
            production_loss = self._production_loss(production, self._job(task, context))
        verdict = judge(outcome.eval_loss, outcome.baseline_eval_loss, production_loss)
        if verdict.promote:
            self.registry.promote(ref.key, ref.version)
        outcome.production_eval_loss, outcome.promoted = production_loss, verdict.promote
        outcome.reason = verdict.reason if mine else f"{earlier}; its gate finished now: {verdict.reason}"
        return outcome


def _version_label(ref: VersionRef | None) -> str:
    return str(ref.version) if ref is not None else "none"


def _reason(exc: Exception) -> str:
    """Our own errors read as they are; anything else also names its type."""
    return str(exc) if isinstance(exc, (RegistryError, WorkerError)) else f"{type(exc).__name__}: {exc}"


def _resolved(item: Outcome | Future[Outcome]) -> Outcome:
    return item.result() if isinstance(item, Future) else item


# Restarted after a crash (the backbone is reloaded) and the interrupted chunk is retried on it.
TrainerActor = ray.remote(max_restarts=3, max_task_retries=3, concurrency_groups={"status": 1})(UserTrainer)
