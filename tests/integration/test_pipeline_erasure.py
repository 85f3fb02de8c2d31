"""Erasure through training jobs, on a real `mlflow server` and S3: after `forget`, no MLflow table,
no stored object and no job run's artifact holds the user's id (job runs name users by pseudonym);
a job that started before the forget publishes nothing of the user; one started after may."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from prefixfleet.pipelines.training.job import JobRequest, JobSummary, run_job, start_fleet
from prefixfleet.pipelines.training.outcome import FORGOTTEN
from prefixfleet.registry import NotFound, Registry, UserKey
from prefixfleet.workers.spec import TrainConfig
from tests.fixtures.backbones import TinyBackbones
from tests.fixtures.tamper import rows_mentioning
from tests.pipelines.pipeline_support import BACKBONE, STEPS, synthetic, write_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.servers]


def spellings(key: UserKey) -> list[str]:
    """Every way the id could be written down: as is, escaped for MLflow and S3, JSON-escaped."""
    return [key.user_id, key.escaped_user, json.dumps(key.user_id)[1:-1]]


def leftovers(registry: Registry, server_dir: Path, key: UserKey) -> list[str]:
    """Where anything of `key` is still written: MLflow rows, job-run artifact files, S3 objects."""
    needles = spellings(key)
    rows = rows_mentioning(f"sqlite:///{server_dir / 'mlflow.db'}", needles)
    found = [f"mlflow table {table}: {row}" for table, row in rows]
    for path in (server_dir / "artifacts").rglob("*"):
        if path.is_file() and any(n.encode() in path.read_bytes() for n in needles):
            found.append(f"job-run artifact {path.relative_to(server_dir)}")
    bucket, _, prefix = registry.store_uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=registry.s3_endpoint_url)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            if any(n in item["Key"] or n.encode() in body for n in needles):
                found.append(f"s3 object {item['Key']}")
    return found


def stored_rows(registry: Registry, summary: JobSummary) -> list[dict]:
    client = MlflowClient(registry.tracking_uri)
    table = json.loads(Path(client.download_artifacts(summary.job_id, "per_user.json")).read_text())
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


def test_forget_leaves_no_trace_in_mlflow_s3_or_job_runs_and_outlives_jobs_started_before_it(
        tiny_backbones: TinyBackbones, local_ray: None, server_env: dict[str, str], mlflow_server,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry.from_env()
    target = UserKey("default", f"Forget.Me-{uuid.uuid4().hex[:8]}")  # upper case and '.': escaped differs
    rows = synthetic(3)
    first = rows[0]["user_id"]
    rows = [dict(r, user_id=target.user_id) if r["user_id"] == first else r for r in rows]
    others = [UserKey("default", u) for u in sorted({r["user_id"] for r in rows} - {target.user_id})]
    request = JobRequest(str(write_jsonl(tmp_path / "day1.jsonl", rows)), tiny_backbones.path(**BACKBONE),
                         config=TrainConfig(steps=STEPS), actors=1, actor_cpus=0.5, progress=False)

    with start_fleet(request, registry, 3) as fleet:
        trained = run_job(request, registry, tmp_path, fleet)
        assert trained.users["trained"] == 3
        stored = stored_rows(registry, trained)
        assert {r["user"] for r in stored} == {registry.pseudonym(k) for k in [target, *others]}
        assert all("user_id" not in r for r in stored)

        job_start = registry.erasure_snapshot(["default"])  # a job starting now, before the forget
        receipt = registry.forget(target)
        assert receipt.versions == [1] and leftovers(registry, mlflow_server.workdir, target) == []

        monkeypatch.setattr(registry, "erasure_snapshot", lambda namespaces: job_start)
        stale = run_job(request, registry, tmp_path, fleet)
        forgotten, = [o for o in stale.outcomes if o.key == target]
        assert (forgotten.status, forgotten.reason) == ("skipped", FORGOTTEN)
        assert stale.users["trained"] == 0 and stale.users["failed"] == 0
        with pytest.raises(NotFound):
            registry.resolve(target, "candidate", fresh=True)
        assert leftovers(registry, mlflow_server.workdir, target) == []

        monkeypatch.undo()
        later = run_job(request, registry, tmp_path, fleet)  # started after the forget: may train the user
        assert [o.key for o in later.outcomes if o.status == "trained"] == [target]
        assert registry.resolve(target, "candidate", fresh=True).version == 1
    for key in others:
        assert registry.resolve(key, "candidate", fresh=True).run_id == trained.job_id
