"""One training job end to end: read and validate the data, start trainer actors, plan (skip what
is published), train on Ray, and record the job as an MLflow run."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefixfleet.pipelines.cluster import actor_env, connect_ray
from prefixfleet.pipelines.training.data import DataError, TrainingData, read_data
from prefixfleet.pipelines.training.errors import JobError
from prefixfleet.pipelines.training.fleet import Fleet, actor_count, split
from prefixfleet.pipelines.training.outcome import Outcome
from prefixfleet.pipelines.training.plan import JobContext, Plan, plan_train
from prefixfleet.pipelines.training.progress import JobProgress
from prefixfleet.pipelines.training.published import config_params
from prefixfleet.pipelines.training.retrain import plan_retrain
from prefixfleet.pipelines.training.tracking import JobRun
from prefixfleet.registry import Registry, Unavailable, UserKey
from prefixfleet.workers.spec import PrefixSpec, TrainConfig

log = logging.getLogger("prefixfleet")
MODES = ("packed", "isolated")


@dataclass
class JobRequest:
    data: str
    backbone: str
    kind: str = "train"  # "train" | "retrain"
    namespace: str = "default"
    spec: PrefixSpec = field(default_factory=PrefixSpec)
    config: TrainConfig = field(default_factory=TrainConfig)
    mode: str = "packed"  # "isolated": each user trained alone, one actor call per user
    pack_size: int = 8
    skip_bad_rows: bool = False
    address: str | None = None
    actors: int | None = None
    actor_cpus: float = 1.0
    actor_gpus: float = 0.0
    progress: bool | None = None  # live bar; None: when stderr is a terminal


@dataclass
class JobSummary:
    job_id: str
    kind: str
    data: TrainingData
    plan: Plan
    outcomes: list[Outcome]
    elapsed_s: float

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def users(self) -> dict[str, int]:
        return {"read": len(self.data.users), "trained": self.count("trained"),
                "skipped": len(self.plan.skipped) + self.count("skipped"),
                "failed": len(self.plan.failed) + self.count("failed"),
                "promoted": sum(o.promoted for o in self.outcomes)}

    @property
    def per_user(self) -> list[Outcome]:
        """Trained, failed and promoted users (the other skipped ones are only counted)."""
        planned = [Outcome.failed(f.key, f.reason) for f in self.plan.failed]
        return [o for o in self.outcomes if o.status != "skipped" or o.promoted] + planned

    def metrics(self) -> dict[str, float]:
        trained = [o for o in self.outcomes if o.status == "trained" and o.eval_loss is not None]
        out = {f"users_{k}": float(v) for k, v in self.users.items()}
        out.update(rows_read=self.data.rows_read, rows_skipped=len(self.data.bad_rows), elapsed_s=self.elapsed_s,
                   users_per_minute=60 * len(self.outcomes) / max(self.elapsed_s, 1e-9))
        if trained:
            out["mean_eval_loss"] = sum(o.eval_loss for o in trained) / len(trained)
            out["mean_baseline_eval_loss"] = sum(o.baseline_eval_loss for o in trained) / len(trained)
        return out

    def to_json(self, pseudonym: Callable[[UserKey], str] | None = None) -> dict[str, Any]:
        """The summary; with `pseudonym`, as the job run stores it: no user id in it."""
        return {
            "job_id": self.job_id, "kind": self.kind,
            "rows": {"read": self.data.rows_read, "skipped": len(self.data.bad_rows), "used": self.data.rows_used},
            "users": self.users,
            "per_user": [o.to_record(pseudonym(o.key)) if pseudonym else o.to_json() for o in self.per_user],
            "bad_rows": [str(b) for b in self.data.bad_rows],
            "elapsed_s": round(self.elapsed_s, 3),
        }

    def describe(self) -> str:
        u = self.users
        return (f"read {self.data.rows_read} rows for {u['read']} users ({len(self.data.bad_rows)} bad rows skipped); "
                f"trained {u['trained']}, skipped {u['skipped']}, failed {u['failed']}; promoted {u['promoted']}")


def load_data(request: JobRequest) -> TrainingData:
    """Read and validate; refuse bad rows unless told to skip them."""
    data = read_data(request.data, request.namespace)
    bad = data.bad_rows
    if bad and not request.skip_bad_rows:
        raise DataError(f"{len(bad)} bad row(s) in {request.data}, nothing trained (first: {bad[0]}); "
                        "fix them or pass --skip-bad-rows", bad)
    for row in bad:
        log.warning("skipping bad row %s", row)
    log.info("read %d rows for %d users from %d file(s)", data.rows_read, len(data.users), len(data.files))
    return data


def backbone_id(backbone: str) -> str:
    """A local path made absolute (actors and `generate` find it from anywhere); ids unchanged."""
    path = Path(backbone).expanduser()
    return str(path.resolve()) if path.exists() else backbone


def start_fleet(request: JobRequest, registry: Registry, users: int) -> Fleet:
    """Connect to Ray and start the job's trainer actors (as many as fit, at most one per user)."""
    local = connect_ray(request.address)
    if not local and not registry.tracking_uri.startswith(("http://", "https://")):
        log.warning("the registry (%s) is on this machine: trainer actors on other nodes cannot reach it; "
                    "set MLFLOW_TRACKING_URI and PREFIXFLEET_STORE to shared servers", registry.tracking_uri)
    count = request.actors or actor_count(max(1, users), request.actor_cpus, request.actor_gpus)
    return Fleet(backbone_id(request.backbone), registry.address, actors=count, cpus=request.actor_cpus,
                 gpus=request.actor_gpus, env=actor_env(local))


def run_job(request: JobRequest, registry: Registry, home: Path, fleet: Fleet | None = None) -> JobSummary:
    """Train every user the plan keeps; raises JobError (or DataError) when the job cannot run.

    `fleet`: trainer actors already running for this backbone and registry (kept running after);
    without it the job starts its own and stops them at the end.
    """
    if request.mode not in MODES:
        raise JobError(f"unknown mode {request.mode!r}; expected packed or isolated")
    started = time.monotonic()
    data = load_data(request)
    if fleet is not None:
        return _run(request, registry, home, data, fleet, started)
    with start_fleet(request, registry, len(data.users)) as own:
        return _run(request, registry, home, data, own, started)


def _run(request: JobRequest, registry: Registry, home: Path, data: TrainingData, fleet: Fleet,
         started: float) -> JobSummary:
    if (fleet.backbone, fleet.registry) != (backbone_id(request.backbone), registry.address):
        raise JobError("the trainer actors were started for another backbone or registry")
    fingerprint = fleet.fingerprint()
    isolated = request.mode == "isolated"
    pack_size = 1 if isolated else request.pack_size
    planner = plan_retrain if request.kind == "retrain" else plan_train
    try:
        erasures = registry.erasure_snapshot({key.namespace for key in data.users})  # the job's start
        plan = planner(data, registry, request.spec, request.config, fingerprint)
    except Unavailable as exc:
        raise JobError(f"cannot plan the job: {exc}") from exc
    log.info("plan: %d to train, %d skipped, %d failed", len(plan.tasks), len(plan.skipped), len(plan.failed))
    run = JobRun(registry.tracking_uri, home)
    run_id = run.start(request.kind, {
        "data": request.data, "backbone": fleet.backbone, "backbone_fingerprint": fingerprint,
        "mode": request.mode, "pack_size": pack_size, "actors": len(fleet.actors), "namespace": request.namespace,
        "spec": request.spec.to_json(), **config_params(request.config),
    })
    try:
        context = JobContext(run_id, request.kind, fleet.backbone, request.config, pack_size, erasures)
        chunks = split(plan.tasks, len(fleet.actors), pack_size, isolated)
        with JobProgress(len(plan.tasks), len(plan.skipped), live=request.progress) as progress:
            outcomes = fleet.run(chunks, context, progress)
        fleet.check_unchanged()
        order = {task.key: i for i, task in enumerate(plan.tasks)}
        outcomes.sort(key=lambda o: order[o.key])
        summary = JobSummary(run_id, request.kind, data, plan, outcomes, time.monotonic() - started)
        if down := [o for o in outcomes if o.unavailable]:
            raise JobError(f"stopped: {down[0].unavailable_reason}. "
                           f"{summary.count('trained')} users were trained and published before; "
                           f"run the same command again to finish the other {len(down)}")
        run.finish(summary.metrics(), outcomes, summary.to_json(registry.pseudonym), registry.pseudonym)
    except BaseException as exc:
        run.fail(f"{type(exc).__name__}: {exc}")
        raise
    log.info("%s", summary.describe())
    return summary
