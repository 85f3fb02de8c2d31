"""Training jobs on local Ray through flaky servers: a fault proxy in front of the real `mlflow
server` and the real S3-compatible server faults a share of the requests of the driver and of
every trainer actor (503, reset before the server sees the request, response lost after the
write took effect), or refuses everything for a while. Every user is still trained, published
and promoted exactly once: in that one job when the faults are flaky or the outage is short; by a
re-run after a job stopped because the outage outlasted its deadline."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from prefixfleet.pipelines.training.errors import JobError
from prefixfleet.pipelines.training.job import JobRequest, run_job
from prefixfleet.registry import Registry, UserKey, fsck
from prefixfleet.registry.retry import DEADLINE_VAR
from prefixfleet.workers.spec import TrainConfig
from tests.fixtures.backbones import TinyBackbones
from tests.fixtures.faults import FaultProxy
from tests.fixtures.servers import make_server_registry
from tests.pipelines.pipeline_support import BACKBONE, STEPS, synthetic, write_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.servers]
USERS = 8
FAULT_RATE = 0.15


def test_a_job_through_faulty_servers_publishes_every_user_exactly_once(
        tiny_backbones: TinyBackbones, local_ray: None, mlflow_server_uri: str, s3_endpoint: str, s3_bucket: str,
        tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", synthetic(USERS))
    with FaultProxy(mlflow_server_uri, rate=FAULT_RATE, seed=21) as mlflow, \
            FaultProxy(s3_endpoint, rate=FAULT_RATE, seed=22) as s3, \
            make_server_registry(mlflow.url, s3.url, s3_bucket) as registry, \
            Registry(mlflow_server_uri, registry.store_uri, s3_endpoint_url=s3_endpoint,
                     model_prefix=registry.prefix) as direct:
        request = JobRequest(str(data), tiny_backbones.path(**BACKBONE), config=TrainConfig(steps=STEPS), actors=2,
                             actor_cpus=0.5, progress=False)
        summary = run_job(request, registry, tmp_path)
        assert summary.users == {"read": USERS, "trained": USERS, "skipped": 0, "failed": 0, "promoted": USERS}, \
            [o.reason for o in summary.per_user if o.status == "failed"]
        for outcome in summary.outcomes:
            history = direct.history(outcome.key)
            assert [(r.version, r.run_id) for r in history] == [(1, summary.job_id)], outcome.key
            assert "production" in history[0].aliases
        assert fsck(direct, grace_s=0).faults == []
        assert mlflow.faulted >= 10 and s3.faulted >= 1, (mlflow.counts, s3.counts)
        print(f"faults: MLflow {dict(mlflow.counts)}, S3 {dict(s3.counts)}")


def _published_any(direct: Registry) -> bool:
    return next(direct.list_users("default"), None) is not None


def _run_in_thread(request: JobRequest, registry: Registry, home: Path) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = run_job(request, registry, home)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _wait_for(condition, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _one_version_each_in_production(direct: Registry, users: int) -> None:
    for i in range(users):
        history = direct.history(UserKey("default", f"user-{i:05d}"))
        assert [r.version for r in history] == [1] and "production" in history[0].aliases


def test_a_five_second_mlflow_outage_mid_job_is_waited_out(
        tiny_backbones: TinyBackbones, local_ray: None, mlflow_server_uri: str, s3_endpoint: str, s3_bucket: str,
        tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", synthetic(USERS))
    with FaultProxy(mlflow_server_uri) as mlflow, FaultProxy(s3_endpoint) as s3, \
            make_server_registry(mlflow.url, s3.url, s3_bucket) as registry, \
            Registry(mlflow_server_uri, registry.store_uri, s3_endpoint_url=s3_endpoint,
                     model_prefix=registry.prefix) as direct:
        request = JobRequest(str(data), tiny_backbones.path(**BACKBONE), config=TrainConfig(steps=STEPS), actors=1,
                             pack_size=2, actor_cpus=0.5, progress=False)
        thread, result = _run_in_thread(request, registry, tmp_path)
        _wait_for(lambda: _published_any(direct))
        with mlflow.outage():
            time.sleep(5)
        thread.join(timeout=300)
        summary = result["summary"]
        assert summary.users == {"read": USERS, "trained": USERS, "skipped": 0, "failed": 0, "promoted": USERS}
        assert mlflow.counts["outage"] > 0  # the job really met the outage
        _one_version_each_in_production(direct, USERS)


def test_an_outage_past_the_deadline_stops_the_job_and_the_rerun_finishes_it(
        tiny_backbones: TinyBackbones, local_ray: None, mlflow_server_uri: str, s3_endpoint: str, s3_bucket: str,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEADLINE_VAR, "3")  # this process's registry, and forwarded to the trainer actors
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the job run's own MlflowClient
    data = write_jsonl(tmp_path / "data.jsonl", synthetic(USERS))
    with FaultProxy(mlflow_server_uri) as mlflow, FaultProxy(s3_endpoint) as s3, \
            make_server_registry(mlflow.url, s3.url, s3_bucket) as registry, \
            Registry(mlflow_server_uri, registry.store_uri, s3_endpoint_url=s3_endpoint,
                     model_prefix=registry.prefix) as direct:
        request = JobRequest(str(data), tiny_backbones.path(**BACKBONE), config=TrainConfig(steps=STEPS), actors=1,
                             pack_size=2, actor_cpus=0.5, progress=False)
        thread, result = _run_in_thread(request, registry, tmp_path)
        _wait_for(lambda: _published_any(direct))
        with mlflow.outage():
            thread.join(timeout=300)
        error = result["error"]
        assert isinstance(error, JobError), error
        assert "MLflow unreachable" in str(error) and "run the same command again to finish" in str(error)
        published = sum(1 for _ in direct.list_users("default"))
        assert 0 < published < USERS

        rerun = run_job(request, registry, tmp_path)
        assert rerun.users["failed"] == 0 and rerun.users["trained"] + rerun.users["skipped"] == USERS
        _one_version_each_in_production(direct, USERS)
