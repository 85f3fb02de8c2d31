"""Two training jobs on the same data at once, against the real servers. Artifact uploads to S3
are held (behind the fault proxy) until both jobs' trainers have planned their first chunk, so
both train those users and publish them together; the registry keeps one version per user, in
production."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
from ray.exceptions import RayError

from prefixfleet.pipelines.training.fleet import ACTOR_NAME
from prefixfleet.pipelines.training.job import JobRequest, run_job
from prefixfleet.registry import UserKey, fsck
from prefixfleet.registry.retry import DEADLINE_VAR
from prefixfleet.workers.spec import TrainConfig
from tests.fixtures.backbones import TinyBackbones
from tests.fixtures.faults import FaultProxy
from tests.fixtures.servers import make_server_registry
from tests.pipelines.pipeline_support import BACKBONE, STEPS, synthetic, write_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.servers]
USERS = 6
FIRST_CHUNK = 3  # one actor, packs of 2: chunks of 3 and 3


def _trainers_that_planned(users: int) -> int:
    """Trainer actors whose current chunk has `users` users planned."""
    planned = 0
    for name in ray.util.list_named_actors():
        if name.startswith(ACTOR_NAME):
            try:
                planned += ray.get(ray.get_actor(name).status.remote(), timeout=5)["chunk_planned"] >= users
            except (ValueError, RayError):  # not up yet, or gone
                pass
    return planned


def test_two_jobs_on_the_same_data_at_once_leave_one_version_per_user(
        tiny_backbones: TinyBackbones, local_ray: None, mlflow_server_uri: str, s3_endpoint: str, s3_bucket: str,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEADLINE_VAR, "300")  # the publishes wait out the held S3, however long planning takes
    data = write_jsonl(tmp_path / "data.jsonl", synthetic(USERS))
    request = JobRequest(str(data), tiny_backbones.path(**BACKBONE), config=TrainConfig(steps=STEPS), actors=1,
                         actor_cpus=0.5, pack_size=2, progress=False)
    with FaultProxy(s3_endpoint) as s3, make_server_registry(mlflow_server_uri, s3.url, s3_bucket) as registry, \
            ThreadPoolExecutor(2) as pool:
        with s3.outage(only=lambda method, path: method == "PUT" and ".safetensors" in path):
            jobs = [pool.submit(run_job, request, registry, tmp_path / f"job{i}") for i in range(2)]
            deadline = time.monotonic() + 240
            while _trainers_that_planned(FIRST_CHUNK) < 2:
                assert time.monotonic() < deadline and not any(j.done() for j in jobs), "the jobs did not both plan"
                time.sleep(0.2)
        summaries = [job.result(timeout=600) for job in jobs]
        for summary in summaries:
            assert summary.users["trained"] >= FIRST_CHUNK  # both trained the first chunk's users
            assert summary.users["failed"] == 0 and summary.users["trained"] + summary.users["skipped"] == USERS
        for i in range(USERS):
            history = registry.history(UserKey("default", f"user-{i:05d}"))
            assert [r.version for r in history] == [1] and "production" in history[0].aliases
        assert fsck(registry, grace_s=0).faults == []
