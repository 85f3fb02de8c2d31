"""Training jobs on local Ray against a real `mlflow server` and a real S3-compatible server, with
the data itself on S3: train, re-run (nothing republished), retrain only the user whose data
changed (warm start), the gate keeping a deliberately bad candidate out of production, rollback,
and an actor process killed mid-chunk with every user still published exactly once."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import boto3
import pytest
import ray
from mlflow import MlflowClient
from ray.exceptions import RayError

from prefixfleet.pipelines.training.fleet import ACTOR_NAME
from prefixfleet.pipelines.training.job import JobRequest, JobSummary, run_job, start_fleet
from prefixfleet.registry import Registry, UserKey, VersionRef
from prefixfleet.workers.spec import TrainConfig
from tests.fixtures.backbones import TinyBackbones
from tests.pipelines.pipeline_support import BACKBONE, STEPS, restyled, synthetic, write_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.servers]
USERS = 4


@pytest.fixture(scope="module")
def backbone(tiny_backbones: TinyBackbones, local_ray: None) -> str:
    return tiny_backbones.path(**BACKBONE)


def upload(endpoint: str, bucket: str, key: str, rows: list[dict]) -> str:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=body)
    return f"s3://{bucket}/{key}"


def by_user(summary: JobSummary) -> dict[str, object]:
    return {o.key.user_id: o for o in summary.per_user}


def current(registry: Registry, key: UserKey, alias: str = "production") -> VersionRef:
    """A fresh resolution: the actors moved aliases through their own registry clients."""
    registry.invalidate(key)
    return registry.resolve(key, alias)


def test_train_rerun_retrain_gate_rollback(backbone: str, server_env: dict[str, str], s3_bucket: str,
                                           tmp_path: Path) -> None:
    endpoint, folder = server_env["AWS_ENDPOINT_URL"], server_env["PREFIXFLEET_MODEL_PREFIX"]
    registry = Registry.from_env()
    rows = synthetic(USERS)
    day1 = upload(endpoint, s3_bucket, f"{folder}-data/day1.jsonl", rows)
    request = JobRequest(day1, backbone, config=TrainConfig(steps=STEPS), actors=2, actor_cpus=0.5, progress=False)
    users = sorted({r["user_id"] for r in rows})
    key = {u: UserKey("default", u) for u in users}

    with start_fleet(request, registry, USERS) as fleet:
        first = run_job(request, registry, tmp_path, fleet)
        assert first.users == {"read": USERS, "trained": USERS, "skipped": 0, "failed": 0, "promoted": USERS}
        for u in users:
            ref = current(registry, key[u])
            assert ref.run_id == first.job_id and ref.version == 1 and "candidate" in ref.aliases
            linked = MlflowClient(registry.tracking_uri).get_model_version(key[u].model_name(folder), "1")
            assert linked.run_id == first.job_id  # the MLflow UI's link from the version to its job run
        run = MlflowClient(registry.tracking_uri).get_run(first.job_id)
        assert run.info.status == "FINISHED" and run.data.metrics["users_promoted"] == USERS
        artifacts = {a.path for a in MlflowClient(registry.tracking_uri).list_artifacts(first.job_id)}
        assert {"per_user.json", "loss_curves.png"} <= artifacts

        rerun = run_job(request, registry, tmp_path, fleet)
        assert rerun.users["trained"] == 0 and rerun.users["skipped"] == USERS and rerun.per_user == []

        # user 1 now writes in another user's style: only they are retrained, from production
        changed, bad = users[1], users[2]
        day2 = upload(endpoint, s3_bucket, f"{folder}-data/day2.jsonl", restyled(rows, changed, style_index=40))
        retrain = JobRequest(day2, backbone, kind="retrain", config=TrainConfig(steps=STEPS), actors=2,
                             actor_cpus=0.5, progress=False)
        second = run_job(retrain, registry, tmp_path, fleet)
        assert second.users["trained"] == 1 and second.users["skipped"] == USERS - 1
        outcome = by_user(second)[changed]
        assert outcome.production_eval_loss is not None and outcome.promoted, outcome.reason
        assert outcome.eval_loss < outcome.production_eval_loss
        promoted = current(registry, key[changed])
        assert promoted.version == 2 and promoted.tags["reason"].startswith("data changed since production")

        again = run_job(retrain, registry, tmp_path, fleet)
        assert again.users["trained"] == 0 and again.per_user == []

        # a deliberately bad candidate: an absurd learning rate for a few steps
        day3 = upload(endpoint, s3_bucket, f"{folder}-data/day3.jsonl",
                      restyled(restyled(rows, changed, style_index=40), bad, style_index=2))
        reckless = JobRequest(day3, backbone, kind="retrain", config=TrainConfig(steps=3, lr=40.0), actors=2,
                              actor_cpus=0.5, progress=False)
        third = run_job(reckless, registry, tmp_path, fleet)
        outcome = by_user(third)[bad]
        assert third.users["trained"] == 1 and outcome.status == "trained" and not outcome.promoted
        assert "does not beat" in outcome.reason
        assert current(registry, key[bad]).version == 1
        assert current(registry, key[bad], "candidate").version == 2

    restored = registry.rollback(key[changed])
    assert restored.version == 1 and current(registry, key[changed]).version == 1


def _trainer_status() -> dict | None:
    """pid and chunk progress of the running trainer actor, if one answers right now."""
    for name in ray.util.list_named_actors():
        if name.startswith(ACTOR_NAME):
            try:
                ready, _ = ray.wait([ray.get_actor(name).status.remote()], timeout=0.5)
                if ready:
                    return ray.get(ready[0])
            except (ValueError, RayError):  # an actor of an earlier job, gone by now
                continue
    return None


def test_actor_killed_mid_chunk_publishes_every_user_once(backbone: str, server_env: dict[str, str],
                                                          tmp_path: Path) -> None:
    registry = Registry.from_env()
    rows = synthetic(8)  # one actor, packs of 2: the first chunk is 4 users
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    request = JobRequest(str(data), backbone, config=TrainConfig(steps=40), pack_size=2, actors=1,
                         actor_cpus=0.5, progress=False)
    result: dict[str, JobSummary] = {}
    job = threading.Thread(target=lambda: result.setdefault("summary", run_job(request, registry, tmp_path)))
    job.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline:
        status = _trainer_status()
        if status and 2 <= status["chunk_done"] < status["chunk_size"]:
            killed = status["pid"]
            os.kill(killed, signal.SIGKILL)  # the chunk's first pack is published, its second is not
        time.sleep(0.05)
    job.join(timeout=300)
    assert killed is not None, "the chunk never reached the point to kill it"
    summary = result["summary"]
    assert summary.users["trained"] == 8 and summary.users["failed"] == 0
    for user in sorted({r["user_id"] for r in rows}):
        history = registry.history(UserKey("default", user))
        assert len(history) == 1 and history[0].run_id == summary.job_id
        assert "production" in history[0].aliases
