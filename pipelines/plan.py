"""Which users a job trains: a user whose (data fingerprint, spec, backbone fingerprint) is already
published is skipped, so running the same job twice publishes nothing the second time."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipelines.data import TrainingData, UserData
from registry import Registry, UserKey
from registry.errors import RegistryError
from workers.data import Example
from workers.spec import PrefixSpec


@dataclass(frozen=True)
class UserTask:
    """One user to train. Empty `eval`: a per-user hold-out is taken. `warm_start`: the version
    whose prefix training starts from (its spec is `spec`)."""

    namespace: str
    user_id: str
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    data_fingerprint: str
    spec: PrefixSpec
    warm_start: int | None = None
    reason: str = "new data"

    @property
    def key(self) -> UserKey:
        return UserKey(self.namespace, self.user_id)

    @property
    def label(self) -> str:
        """Unique within a job: namespaces never contain '/'."""
        return f"{self.namespace}/{self.user_id}"


@dataclass(frozen=True)
class Skip:
    namespace: str
    user_id: str
    reason: str
    version: int | None = None


@dataclass(frozen=True)
class Failure:
    namespace: str
    user_id: str
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
             reason: str = "new data") -> UserTask:
    return UserTask(user.namespace, user.user_id, tuple(user.train), tuple(user.eval), fingerprint, spec,
                    warm_start, reason)


def build_plan(data: TrainingData, decide: Decide, threads: int = 16) -> Plan:
    """Apply `decide(user, data fingerprint)` to every user (registry look-ups run concurrently)."""
    def one(user: UserData) -> UserTask | Skip | Failure:
        if not user.train:
            return Failure(user.namespace, user.user_id, f"no training rows ({len(user.eval)} rows, all split 'eval')")
        try:
            return decide(user, user.fingerprint)
        except RegistryError as exc:
            return Failure(user.namespace, user.user_id, f"registry: {exc}")

    plan = Plan()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for item in pool.map(one, data.users.values()):
            plan.add(item)
    return plan


def plan_train(data: TrainingData, registry: Registry, spec: PrefixSpec, backbone_fingerprint: str) -> Plan:
    """Every user whose data, with this spec on this backbone, is not published yet."""
    def decide(user: UserData, fingerprint: str) -> UserTask | Skip:
        found = registry.find(UserKey(user.namespace, user.user_id), data_fingerprint=fingerprint,
                              spec=spec.to_json(), backbone_fingerprint=backbone_fingerprint)
        if found is not None:
            return Skip(user.namespace, user.user_id, f"already published as version {found.version}", found.version)
        return task_for(user, fingerprint, spec)

    return build_plan(data, decide, registry.max_workers)
