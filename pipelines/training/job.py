"""One training job end to end: read, validate and group the data on Ray Data, start trainer
actors, let them plan (skip what is published) and train chunk by chunk, and record the job as an
MLflow run. The driver holds block references and counts, never the users' data."""
from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefixfleet.pipelines.cluster import actor_env, connect_ray
from prefixfleet.pipelines.placement import node_resources, plan_actors
from prefixfleet.pipelines.training.data import BadRow, DataError
from prefixfleet.pipelines.training.errors import JobError
from prefixfleet.pipelines.training.fleet import Fleet, chunks
from prefixfleet.pipelines.training.ingest import Ingested, ingest
from prefixfleet.pipelines.training.outcome import Outcome
from prefixfleet.pipelines.training.plan import JobContext
from prefixfleet.pipelines.training.progress import JobProgress
from prefixfleet.pipelines.training.published import config_params
from prefixfleet.pipelines.training.tally import Tally, listed
from prefixfleet.pipelines.training.tracking import JobRun
from prefixfleet.registry import Registry, Unavailable, UserKey
from prefixfleet.registry.retry import waiting_at_most
from prefixfleet.workers.spec import PrefixSpec, TrainConfig

log = logging.getLogger("prefixfleet")
MODES = ("packed", "isolated")
REACH_DEADLINE_S = 8.0  # a server unreachable when the job starts ends it this soon; later, the outage deadline


@dataclass
class JobRequest:
    data: Any  # a path or s3:// URI (file or folder), a `save_to_disk` folder, or a datasets.Dataset
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
    per_user_out: Path | None = None  # every per-user row as JSONL (users by id)
    dry_run: bool = False  # plan only: each user's decision to `on_outcome`; nothing trained, no job run
    on_outcome: Callable[[Outcome], None] | None = None  # called in the driver as each user is decided


@dataclass(frozen=True)
class DataCounts:
    """What a job read (the summary holds no reference to the ingested blocks: they are freed)."""

    user_count: int
    rows_read: int
    bad_count: int
    bad_rows: list[BadRow]

    @property
    def rows_used(self) -> int:
        return self.rows_read - self.bad_count


@dataclass
class JobSummary:
    """What a job did. `outcomes` holds the first tally.KEPT users' outcomes; the others are counted
    (every one is in the run's per_user.parquet and in --per-user-out)."""

    job_id: str
    kind: str
    data: DataCounts
    counts: dict[str, int]
    outcomes: list[Outcome]
    listed: int  # users of per_user, kept or not
    mean_losses: dict[str, float]
    elapsed_s: float

    @classmethod
    def of(cls, job_id: str, kind: str, data: Ingested, tally: Tally, elapsed_s: float) -> JobSummary:
        counts = DataCounts(data.user_count, data.rows_read, data.bad_count, data.bad_rows)
        return cls(job_id, kind, counts, dict(tally.counts), list(tally.kept), tally.listed, tally.mean_losses(),
                   elapsed_s)

    def count(self, status: str) -> int:
        return self.counts.get(status, 0)

    @property
    def dry_run(self) -> bool:
        return not self.job_id

    @property
    def users(self) -> dict[str, int]:
        """Counts by outcome; a dry run's `planned` are the users it would train."""
        if self.dry_run:
            return {"read": self.data.user_count, "planned": self.count("planned"), "skipped": self.count("skipped"),
                    "failed": self.count("failed")}
        return {"read": self.data.user_count, "trained": self.count("trained"), "skipped": self.count("skipped"),
                "failed": self.count("failed"), "promoted": self.count("promoted")}

    @property
    def per_user(self) -> list[Outcome]:
        """Trained, failed and promoted users (the other skipped ones are only counted)."""
        return [o for o in self.outcomes if listed(o)]

    @property
    def truncated(self) -> bool:
        return self.listed > len(self.per_user)

    def metrics(self) -> dict[str, float]:
        out = {f"users_{k}": float(v) for k, v in self.users.items()}
        trained_or_failed = self.count("trained") + self.count("failed")
        out.update(rows_read=self.data.rows_read, rows_skipped=self.data.bad_count, elapsed_s=self.elapsed_s,
                   users_per_minute=60 * trained_or_failed / max(self.elapsed_s, 1e-9), **self.mean_losses)
        return out

    def to_json(self, pseudonym: Callable[[UserKey], str] | None = None) -> dict[str, Any]:
        """The summary; with `pseudonym`, as the job run stores it: no user id in it. `per_user`
        is left empty when the kept outcomes do not hold every one of its users."""
        shown = [] if self.truncated else self.per_user
        return {
            "job_id": self.job_id, "kind": self.kind,
            "rows": {"read": self.data.rows_read, "skipped": self.data.bad_count, "used": self.data.rows_used},
            "users": self.users,
            "per_user": [o.to_record(pseudonym(o.key)) if pseudonym else o.to_json() for o in shown],
            "per_user_rows": self.listed, "per_user_truncated": self.truncated,
            "bad_rows": [str(b) for b in self.data.bad_rows],
            "elapsed_s": round(self.elapsed_s, 3),
        }

    def describe(self) -> str:
        u = self.users
        if self.dry_run:
            return (f"dry run: read {self.data.rows_read} rows for {u['read']} users ({self.data.bad_count} bad rows); "
                    f"would train {u['planned']}, skip {u['skipped']}, refuse {u['failed']}")
        return (f"read {self.data.rows_read} rows for {u['read']} users ({self.data.bad_count} bad rows skipped); "
                f"trained {u['trained']}, skipped {u['skipped']}, failed {u['failed']}; promoted {u['promoted']}")


def load_data(request: JobRequest) -> Ingested:
    """Read, validate and group on Ray; refuse bad rows unless told to skip them (a dry run lists
    them and plans the rest)."""
    data = ingest(request.data, request.namespace)
    if data.bad_count and not (request.skip_bad_rows or request.dry_run):
        raise DataError(f"{data.bad_count} bad row(s) in {request.data}, nothing trained (first: {data.bad_rows[0]}); "
                        "fix them or pass --skip-bad-rows", data.bad_rows, data.bad_count)
    for row in data.bad_rows:
        log.warning("%s bad row %s", "" if request.dry_run else "skipping", row)
    if data.bad_count > len(data.bad_rows):
        log.warning("… and %d more bad rows", data.bad_count - len(data.bad_rows))
    log.info("read %d rows for %d users from %d source(s)", data.rows_read, data.user_count, len(data.files))
    return data


def backbone_id(backbone: str) -> str:
    """A local path made absolute (actors and `generate` find it from anywhere); ids unchanged."""
    path = Path(backbone).expanduser()
    return str(path.resolve()) if path.exists() else backbone


def start_fleet(request: JobRequest, registry: Registry, users: int) -> Fleet:
    """Connect to Ray and start the job's trainer actors: `request.actors`, or as many as the
    nodes hold and at most one per user; refused at once when the nodes cannot hold them."""
    local = connect_ray(request.address)
    if not local and not registry.tracking_uri.startswith(("http://", "https://")):
        log.warning("the registry (%s) is on this machine: trainer actors on other nodes cannot reach it; "
                    "set MLFLOW_TRACKING_URI and PREFIXFLEET_STORE to shared servers", registry.tracking_uri)
    count = plan_actors(node_resources(), max(1, users), request.actor_cpus, request.actor_gpus, request.actors)
    return Fleet(backbone_id(request.backbone), registry.address, actors=count, cpus=request.actor_cpus,
                 gpus=request.actor_gpus, env=actor_env(local))


def run_job(request: JobRequest, registry: Registry, home: Path, fleet: Fleet | None = None) -> JobSummary:
    """Train every user the plan keeps; raises JobError (or DataError) when the job cannot run.

    `fleet`: trainer actors already running for this backbone and registry (kept running after;
    they must leave a CPU free for reading the data); without it the job starts its own once the
    data is read, and stops them at the end.
    """
    if request.mode not in MODES:
        raise JobError(f"unknown mode {request.mode!r}; expected packed or isolated")
    started = time.monotonic()
    with waiting_at_most(REACH_DEADLINE_S):
        try:
            registry.check_reachable(request.namespace)
        except Unavailable as exc:
            raise JobError(f"cannot start the job: {exc}") from exc
    connect_ray(request.address)
    if fleet is None:  # refused before the data is read, not after
        plan_actors(node_resources(), 1, request.actor_cpus, request.actor_gpus, request.actors)
    data = load_data(request)
    if fleet is not None:
        return _run(request, registry, home, data, fleet, started)
    with start_fleet(request, registry, data.user_count) as own:
        return _run(request, registry, home, data, own, started)


def _run(request: JobRequest, registry: Registry, home: Path, data: Ingested, fleet: Fleet,
         started: float) -> JobSummary:
    if (fleet.backbone, fleet.registry) != (backbone_id(request.backbone), registry.address):
        raise JobError("the trainer actors were started for another backbone or registry")
    fingerprint = fleet.fingerprint()
    log.info("%d trainer actors on %d node(s)", len(fleet.actors), fleet.node_count)
    isolated = request.mode == "isolated"
    pack_size = 1 if isolated else request.pack_size
    try:
        erasures = registry.erasure_snapshot(data.namespaces)  # the job's start
    except Unavailable as exc:
        raise JobError(f"cannot start the job: {exc}") from exc
    if request.dry_run:
        context = JobContext("", request.kind, fleet.backbone, request.config, pack_size, request.spec, erasures,
                             dry_run=True)
        with tempfile.TemporaryDirectory() as folder, Tally(registry.pseudonym, Path(folder) / "per_user.parquet",
                                                            request.per_user_out, request.on_outcome) as tally:
            _plan_and_train(data, fleet, context, tally, request, isolated)
        if tally.down is not None:
            raise JobError(f"stopped: {tally.down.unavailable_reason}")
        summary = JobSummary.of("", request.kind, data, tally, time.monotonic() - started)
        log.info("%s", summary.describe())
        return summary
    run = JobRun(registry.tracking_uri, home)
    run_id = run.start(request.kind, {
        "data": str(request.data), "backbone": fleet.backbone, "backbone_fingerprint": fingerprint,
        "mode": request.mode, "pack_size": pack_size, "actors": len(fleet.actors),
        "actor_nodes": fleet.node_count, "namespace": request.namespace,
        "spec": request.spec.to_json(), **config_params(request.config),
    })
    try:
        context = JobContext(run_id, request.kind, fleet.backbone, request.config, pack_size, request.spec, erasures)
        with tempfile.TemporaryDirectory() as folder, Tally(registry.pseudonym, Path(folder) / "per_user.parquet",
                                                            request.per_user_out, request.on_outcome) as tally:
            _plan_and_train(data, fleet, context, tally, request, isolated)
            fleet.check_unchanged()
            tally.close()
            summary = JobSummary.of(run_id, request.kind, data, tally, time.monotonic() - started)
            if tally.down is not None:
                raise JobError(f"stopped: {tally.down.unavailable_reason}. "
                               f"{summary.count('trained')} users were trained and published before; "
                               f"run the same command again to finish the other {tally.counts['unavailable']}")
            run.finish(summary.metrics(), tally, summary.to_json(registry.pseudonym))
    except BaseException as exc:
        run.fail(f"{type(exc).__name__}: {exc}")
        raise
    log.info("%s", summary.describe())
    return summary


def _plan_and_train(data: Ingested, fleet: Fleet, context: JobContext, tally: Tally, request: JobRequest,
                    isolated: bool) -> None:
    work = chunks(data.blocks, data.user_count, len(fleet.actors), context.pack_size, isolated)
    with JobProgress(data.user_count, live=request.progress) as progress:
        fleet.run(work, context, tally, progress)
