"""Which users a job trains: a user already published from this data, spec, training settings and
backbone is not trained again, so running the same job twice publishes nothing the second time.
Such a version that never reached production goes to the actors only to finish its gate (its job
may have stopped between publish and promote)."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prefixfleet.pipelines.training.data import TrainingData, UserData
from prefixfleet.pipelines.training.published import PublishedLookup
from prefixfleet.registry import ErasureSnapshot, Registry, Unavailable, UserKey, VersionRef
from prefixfleet.registry.errors import RegistryError
from prefixfleet.registry.refs import PRODUCTION
from prefixfleet.workers.data import Example
from prefixfleet.workers.spec import PrefixSpec, TrainConfig


@dataclass(frozen=True)
class UserTask:
    """One user to train. Empty `eval`: a per-user hold-out is taken. `warm_start`: the version
    whose prefix training starts from (its spec is `spec`). `existing`: a version already trained
    from this task's data, spec and settings: its gate is finished instead of training again."""

    key: UserKey
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    data_fingerprint: str
    spec: PrefixSpec
    warm_start: int | None = None
    reason: str = "new data"
    existing: int | None = None


@dataclass(frozen=True)
class JobContext:
    """What every chunk of one job shares."""

    run_id: str
    kind: str  # "train" | "retrain"
    backbone: str  # id or path, recorded in each artifact
    config: TrainConfig
    pack_size: int
    erasures: ErasureSnapshot | None = None  # forgets known at the job's start; None: each publish's


@dataclass(frozen=True)
class Skip:
    key: UserKey
    reason: str
    version: int | None = None


@dataclass(frozen=True)
class Failure:
    key: UserKey
    reason: str


@dataclass
class Plan:
    tasks: list[UserTask] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)

    def add(self, item: UserTask | Skip | Failure) -> None:
        if isinstance(item, UserTask):
            self.tasks.append(item)
        elif isinstance(item, Skip):
            self.skipped.append(item)
        else:
            self.failed.append(item)


Decide = Callable[[UserData, str], "UserTask | Skip | Failure"]


def task_for(user: UserData, fingerprint: str, spec: PrefixSpec, *, warm_start: int | None = None,
             reason: str = "new data", existing: int | None = None) -> UserTask:
    return UserTask(user.key, tuple(user.train), tuple(user.eval), fingerprint, spec, warm_start, reason, existing)


def already_trained(user: UserData, fingerprint: str, spec: PrefixSpec, found: VersionRef) -> UserTask | Skip:
    """A user whose result is published as `found`: skipped once in production, else its gate is
    finished by an actor."""
    if PRODUCTION in found.aliases:
        return Skip(user.key, f"already published as version {found.version} (production)", found.version)
    return task_for(user, fingerprint, spec, reason=f"finish the gate of version {found.version}",
                    existing=found.version)


def build_plan(data: TrainingData, decide: Decide, threads: int = 16) -> Plan:
    """Apply `decide(user, data fingerprint)` to every user (registry look-ups run concurrently)."""
    def one(user: UserData) -> UserTask | Skip | Failure:
        if not user.train:
            return Failure(user.key, f"no training rows ({len(user.eval)} rows, all split 'eval')")
        try:
            return decide(user, user.fingerprint)
        except Unavailable:
            raise  # the job cannot be planned; JobError says so
        except RegistryError as exc:
            return Failure(user.key, f"registry: {exc}")

    plan = Plan()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for item in pool.map(one, data.users.values()):
            plan.add(item)
    return plan


def plan_train(data: TrainingData, registry: Registry, spec: PrefixSpec, config: TrainConfig,
               backbone_fingerprint: str) -> Plan:
    """Every user whose data, with this spec and these settings on this backbone, is not published yet."""
    published = PublishedLookup(registry, backbone_fingerprint)

    def decide(user: UserData, fingerprint: str) -> UserTask | Skip:
        found = published.find(user.key, fingerprint, spec, config)
        if found is not None:
            return already_trained(user, fingerprint, spec, found)
        return task_for(user, fingerprint, spec)

    return build_plan(data, decide, registry.max_workers)
