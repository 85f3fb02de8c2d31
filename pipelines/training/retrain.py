"""Nightly retraining plan: only users whose data changed since their production prefix (and users
never promoted), warm-started from production with production's spec."""
from __future__ import annotations

from prefixfleet.pipelines.training.data import TrainingData, UserData
from prefixfleet.pipelines.training.plan import Failure, Plan, Skip, UserTask, already_trained, build_plan, task_for
from prefixfleet.pipelines.training.published import PublishedLookup
from prefixfleet.registry import NotFound, Registry, VersionRef
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.spec import PrefixSpec, TrainConfig


def plan_retrain(data: TrainingData, registry: Registry, spec: PrefixSpec, config: TrainConfig,
                 backbone_fingerprint: str) -> Plan:
    """`spec` applies to users without a production prefix; the others keep production's spec.
    Users whose data is unchanged since production are skipped whatever the settings."""
    published = PublishedLookup(registry, backbone_fingerprint)

    def decide(user: UserData, fingerprint: str) -> UserTask | Skip | Failure:
        key = user.key
        try:  # plan on what production is now, not on a cached resolution
            production: VersionRef | None = registry.resolve(key, "production", fresh=True)
        except NotFound:
            production = None
        if production is not None and production.backbone_fingerprint == backbone_fingerprint \
                and production.data_fingerprint == fingerprint:
            return Skip(key, f"data unchanged since production version {production.version}", production.version)
        if production is None:
            user_spec, warm, reason = spec, None, "no production prefix yet"
        else:
            try:
                user_spec = PrefixSpec.from_dict(production.spec)
            except WorkerError as exc:
                return Failure(key, f"production version {production.version}: {exc}")
            if production.backbone_fingerprint == backbone_fingerprint:
                warm, reason = production.version, f"data changed since production version {production.version}"
            else:
                warm, reason = None, f"production version {production.version} was trained on another backbone"
        found = published.find(key, fingerprint, user_spec, config)
        if found is not None:
            return already_trained(user, fingerprint, user_spec, found)
        return task_for(user, fingerprint, user_spec, warm_start=warm, reason=reason)

    return build_plan(data, decide, registry.max_workers)
