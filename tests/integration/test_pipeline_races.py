"""Two training jobs on the same data at once, against the real servers: both plan before either
publishes, so both train every user; the registry keeps one version per user, in production."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from prefixfleet.pipelines.training.job import JobRequest, run_job
from prefixfleet.registry import Registry, UserKey, fsck
from prefixfleet.workers.spec import TrainConfig
from tests.fixtures.backbones import TinyBackbones
from tests.pipelines.pipeline_support import BACKBONE, STEPS, synthetic, write_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.servers]
USERS = 6


def test_two_jobs_on_the_same_data_at_once_leave_one_version_per_user(
        tiny_backbones: TinyBackbones, local_ray: None, server_env: dict[str, str], tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", synthetic(USERS))
    request = JobRequest(str(data), tiny_backbones.path(**BACKBONE), config=TrainConfig(steps=STEPS), actors=1,
                         actor_cpus=0.5, pack_size=2, progress=False)
    with Registry.from_env() as registry, ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(run_job, request, registry, tmp_path / f"job{i}") for i in range(2)]
        summaries = [job.result(timeout=600) for job in jobs]
        for summary in summaries:
            assert summary.users["failed"] == 0 and summary.users["trained"] + summary.users["skipped"] == USERS
        assert sum(s.users["trained"] for s in summaries) > USERS  # they really raced: some users twice
        for i in range(USERS):
            history = registry.history(UserKey("default", f"user-{i:05d}"))
            assert [r.version for r in history] == [1] and "production" in history[0].aliases
        assert fsck(registry, grace_s=0).faults == []
