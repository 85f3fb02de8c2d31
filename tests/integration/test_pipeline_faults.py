"""Training jobs on local Ray through flaky servers: a fault proxy in front of the real `mlflow
server` and the real S3-compatible server faults a share of the requests of the driver and of
every trainer actor (503, reset before the server sees the request, response lost after the
write took effect), or refuses everything for a while. Every user is still trained, published
and promoted exactly once: in that one job when the faults are flaky or the outage is short; by a
re-run after a job stopped because the outage outlasted its deadline."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
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


@dataclass
class Rig:
    """A job's request, the registry it publishes to through the proxies, and the same registry
    read directly (past the proxies) to check what was written."""

    mlflow: FaultProxy
    s3: FaultProxy
    registry: Registry
    direct: Registry
    request: JobRequest


@pytest.fixture
def rig(tiny_backbones: TinyBackbones, local_ray: None, mlflow_server_uri: str, s3_endpoint: str, s3_bucket: str,
        tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    """`rig(rate=…, actors=…, pack_size=…)`; call it after setting the environment the registry reads."""
    with ExitStack() as stack:
        def make(*, rate: float = 0.0, actors: int = 1, pack_size: int = 2) -> Rig:
            mlflow = stack.enter_context(FaultProxy(mlflow_server_uri, rate=rate, seed=21))
            s3 = stack.enter_context(FaultProxy(s3_endpoint, rate=rate, seed=22))
            registry = stack.enter_context(make_server_registry(mlflow.url, s3.url, s3_bucket))
            direct = stack.enter_context(Registry(mlflow_server_uri, registry.store_uri, s3_endpoint_url=s3_endpoint,
                                                  model_prefix=registry.prefix))
            data = write_jsonl(tmp_path / "data.jsonl", synthetic(USERS))
            request = JobRequest(str(data), tiny_backbones.path(**BACKBONE), config=TrainConfig(steps=STEPS),
                                 actors=actors, pack_size=pack_size, actor_cpus=0.5, progress=False)
            return Rig(mlflow, s3, registry, direct, request)

        yield make


def _run_in_thread(rig: Rig, home: Path) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = run_job(rig.request, rig.registry, home)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 180
    while next(rig.direct.list_users("default"), None) is None:  # until the first user is published
        assert time.monotonic() < deadline and thread.is_alive(), "no user was published"
        time.sleep(0.1)
    return thread, result


def _one_version_each_in_production(direct: Registry) -> None:
    for i in range(USERS):
        history = direct.history(UserKey("default", f"user-{i:05d}"))
        assert [r.version for r in history] == [1] and "production" in history[0].aliases


def test_a_job_through_faulty_servers_publishes_every_user_exactly_once(rig, tmp_path: Path) -> None:
    job = rig(rate=FAULT_RATE, actors=2, pack_size=8)
    summary = run_job(job.request, job.registry, tmp_path)
    assert summary.users == {"read": USERS, "trained": USERS, "skipped": 0, "failed": 0, "promoted": USERS}, \
        [o.reason for o in summary.per_user if o.status == "failed"]
    for outcome in summary.outcomes:
        history = job.direct.history(outcome.key)
        assert [(r.version, r.run_id) for r in history] == [(1, summary.job_id)], outcome.key
        assert "production" in history[0].aliases
    assert fsck(job.direct, grace_s=0).faults == []
    assert job.mlflow.faulted >= 10 and job.s3.faulted >= 1, (job.mlflow.counts, job.s3.counts)


def test_a_five_second_mlflow_outage_mid_job_is_waited_out(rig, tmp_path: Path) -> None:
    job = rig()
    thread, result = _run_in_thread(job, tmp_path)
    with job.mlflow.outage():
        time.sleep(5)
    thread.join(timeout=300)
    summary = result["summary"]
    assert summary.users == {"read": USERS, "trained": USERS, "skipped": 0, "failed": 0, "promoted": USERS}
    assert job.mlflow.counts["outage"] > 0  # the job really met the outage
    _one_version_each_in_production(job.direct)


def test_an_outage_past_the_deadline_stops_the_job_and_the_rerun_finishes_it(
        rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEADLINE_VAR, "3")  # this process's registry, and forwarded to the trainer actors
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the job run's own MlflowClient
    job = rig()
    thread, result = _run_in_thread(job, tmp_path)
    with job.mlflow.outage():
        thread.join(timeout=300)
    error = result["error"]
    assert isinstance(error, JobError), error
    assert "MLflow unreachable" in str(error) and "run the same command again to finish" in str(error)
    assert 0 < sum(1 for _ in job.direct.list_users("default")) < USERS

    rerun = run_job(job.request, job.registry, tmp_path)
    assert rerun.users["failed"] == 0 and rerun.users["trained"] + rerun.users["skipped"] == USERS
    _one_version_each_in_production(job.direct)
