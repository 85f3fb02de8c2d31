"""A training job on local Ray through flaky servers: a fault proxy in front of the real
`mlflow server` and the real S3-compatible server faults a share of the requests of the driver
and of every trainer actor (503, reset before the server sees the request, response lost after
the write took effect). Every user is still trained, published and promoted exactly once, in
that one job."""
from __future__ import annotations

from pathlib import Path

import pytest

from prefixfleet.pipelines.training.job import JobRequest, run_job
from prefixfleet.registry import Registry, fsck
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
        assert fsck(direct).faults == []
        assert mlflow.faulted >= 10 and s3.faulted >= 1, (mlflow.counts, s3.counts)
        print(f"faults: MLflow {dict(mlflow.counts)}, S3 {dict(s3.counts)}")
