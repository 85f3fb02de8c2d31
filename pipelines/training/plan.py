"""Which users a job trains, decided in the trainer actor just before training them, from one
bulk read of the chunk's published index (registry.index): a user already published from this
data, spec, training settings and backbone is not trained again, so running the same job twice
publishes nothing the second time, and a re-run over unchanged users makes one MLflow request per
chunk. Such a version that never reached production (or reached it in this very job, before a
crash) goes to its gate again instead of training. A nightly retrain (`kind="retrain"`) also
skips users whose data is unchanged since production, and warm-starts the others from production
with production's spec."""
from __future__ import annotations

from dataclasses import dataclass

from prefixfleet.pipelines.training.data import UserData
from prefixfleet.pipelines.training.published import PublishedLookup
from prefixfleet.registry import ErasureSnapshot, NotFound, Registry, Unavailable, UserKey, VersionRef
from prefixfleet.registry.errors import RegistryError
from prefixfleet.registry.index import Published
from prefixfleet.workers.data import Example
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.spec import PrefixSpec, TrainConfig


@dataclass(frozen=True)
class UserTask:
    """One user to train. Empty `eval`: a per-user hold-out is taken. `warm_start`: the version
    whose prefix training starts from (its spec is `spec`). `existing`: a version already trained
    from this task's data, spec and settings: its gate is finished instead of training again.
    `published`: what the plan's bulk read said of the user, which its publish builds on."""

    key: UserKey
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    data_fingerprint: str
    spec: PrefixSpec
    warm_start: int | None = None
    reason: str = "new data"
    existing: int | None = None
    published: Published | None = None


@dataclass(frozen=True)
class JobContext:
    """What every chunk of one job shares."""

    run_id: str
    kind: str  # "train" | "retrain"
    backbone: str  # id or path, recorded in each artifact
    config: TrainConfig
    pack_size: int
    spec: PrefixSpec  # for users without a production prefix to follow (retrain) or for all (train)
    erasures: ErasureSnapshot | None = None  # forgets known at the job's start; None: each publish's
    dry_run: bool = False  # plan only: nothing is trained or written


@dataclass(frozen=True)
class Skip:
    key: UserKey
    reason: str
    version: int | None = None


@dataclass(frozen=True)
class Failure:
    key: UserKey
    reason: str


def task_for(user: UserData, spec: PrefixSpec, *, warm_start: int | None = None, reason: str = "new data",
             existing: int | None = None, published: Published | None = None) -> UserTask:
    return UserTask(user.key, tuple(user.train), tuple(user.eval), user.fingerprint, spec, warm_start, reason,
                    existing, published)


class Planner:
    """`decide` for the users of one trainer; thread-safe."""

    def __init__(self, registry: Registry, backbone_fingerprint: str) -> None:
        self.registry, self.fingerprint = registry, backbone_fingerprint
        self.published = PublishedLookup(registry, backbone_fingerprint)

    def lookup(self, users: list[UserData]) -> dict[UserKey, Published | None]:
        """The chunk's bulk read; raises Unavailable when MLflow stays unreachable. A read that
        fails otherwise leaves each user to its own look-up."""
        try:
            return self.registry.published([u.key for u in users])
        except Unavailable:
            raise
        except RegistryError:
            return {}

    def decide(self, user: UserData, context: JobContext, published: Published | None = None
               ) -> UserTask | Skip | Failure:
        """`published`: the user's entry of `lookup` (None: ask MLflow). Raises Unavailable when a
        server stays unreachable; other registry errors fail the user."""
        if not user.train:
            return Failure(user.key, f"no training rows ({len(user.eval)} rows, all split 'eval')")
        try:
            if context.kind == "retrain":
                return self._retrain(user, context, published)
            return self._trained(user, context.spec, context, published) or task_for(
                user, context.spec, published=published)
        except Unavailable:
            raise
        except RegistryError as exc:
            return Failure(user.key, f"registry: {exc}")

    def _trained(self, user: UserData, spec: PrefixSpec, context: JobContext,
                 published: Published | None) -> UserTask | Skip | None:
        """None, or what to do with the version published from exactly this task: skipped once in
        production by an earlier job, else its gate is finished by the actor."""
        found = self.published.find(user.key, user.fingerprint, spec, context.config, published)
        if found is None:
            return None
        if found.in_production and found.run_id != context.run_id:
            return Skip(user.key, f"already published as version {found.version} (production)", found.version)
        return task_for(user, spec, reason=f"finish the gate of version {found.version}", existing=found.version)

    def _retrain(self, user: UserData, context: JobContext, published: Published | None) -> UserTask | Skip | Failure:
        """Users whose data is unchanged since production are skipped whatever the settings."""
        key = user.key
        if published is not None and published.complete:
            indexed = None if published.production is None else published.version(published.production)
            if indexed is not None and (indexed.backbone_fingerprint, indexed.data_fingerprint) \
                    == (self.fingerprint, user.fingerprint) and indexed.run_id != context.run_id:
                return Skip(key, f"data unchanged since production version {indexed.version}", indexed.version)
            production = None if published.production is None else self._production(key)
        else:
            production = self._production(key)
        if production is not None and production.backbone_fingerprint == self.fingerprint \
                and production.data_fingerprint == user.fingerprint and production.run_id != context.run_id:
            return Skip(key, f"data unchanged since production version {production.version}", production.version)
        if production is None:
            spec, warm, reason = context.spec, None, "no production prefix yet"
        else:
            try:
                spec = PrefixSpec.from_dict(production.spec)
            except WorkerError as exc:
                return Failure(key, f"production version {production.version}: {exc}")
            if production.backbone_fingerprint == self.fingerprint:
                warm, reason = production.version, f"data changed since production version {production.version}"
            else:
                warm, reason = None, f"production version {production.version} was trained on another backbone"
        return self._trained(user, spec, context, published) or task_for(user, spec, warm_start=warm, reason=reason,
                                                                         published=published)

    def _production(self, key: UserKey) -> VersionRef | None:
        """Production as it is now, not a cached resolution: a plan decides on it."""
        try:
            return self.registry.resolve(key, "production", fresh=True)
        except NotFound:
            return None
