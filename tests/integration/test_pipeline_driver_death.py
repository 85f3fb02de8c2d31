"""The driver of a training job killed mid-job (SIGKILL: no cleanup runs), against the real
servers: its trainer actors die with it, and the re-run finishes the job — no user published
twice, no published user trained again, none left out of production that the gate passes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from prefixfleet.pipelines.training.job import JobRequest, run_job
from prefixfleet.registry import NotFound, Registry, UserKey
from prefixfleet.workers.spec import TrainConfig
from tests.fixtures.backbones import TinyBackbones
from tests.pipelines.pipeline_support import BACKBONE, synthetic, write_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.servers]
USERS = 8
STEPS = 30


def _published(registry: Registry, keys: list[UserKey]) -> dict[UserKey, list]:
    """The users with at least one version, and their versions."""
    out = {}
    for key in keys:
        try:
            if history := registry.history(key):
                out[key] = history
        except NotFound:
            pass
    return out


def test_a_killed_driver_leaves_a_job_the_rerun_finishes_exactly_once(
        tiny_backbones: TinyBackbones, local_ray: None, server_env: dict[str, str], tmp_path: Path) -> None:
    backbone = tiny_backbones.path(**BACKBONE)
    data = write_jsonl(tmp_path / "data.jsonl", synthetic(USERS))
    keys = [UserKey("default", f"user-{i:05d}") for i in range(USERS)]
    registry = Registry.from_env()
    address = ray.get_runtime_context().gcs_address  # the driver joins this test's Ray as a second driver
    log = (tmp_path / "driver.log").open("w")  # a file, not a pipe: a full pipe would stall the driver
    driver = subprocess.Popen(
        [sys.executable, "-m", "prefixfleet.pipelines.cli", "train", str(data), "--backbone", backbone,
         "--steps", str(STEPS), "--actors", "1", "--actor-cpus", "0.5", "--pack-size", "2", "--address", address,
         "--home", str(tmp_path / "home"), "--json"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(_published(registry, keys)) < 2:
            assert driver.poll() is None, f"the job ended before the kill: {Path(log.name).read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no user was published in time"
            time.sleep(0.1)
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        log.close()
    before = _published(registry, keys)
    assert 2 <= len(before) < USERS, "the kill came too late to leave work behind"

    request = JobRequest(str(data), backbone, config=TrainConfig(steps=STEPS), actors=1, actor_cpus=0.5,
                         pack_size=2, progress=False)
    rerun = run_job(request, registry, tmp_path)
    assert rerun.users["failed"] == 0 and rerun.users["trained"] + rerun.users["skipped"] == USERS
    trained_again = {o.key for o in rerun.outcomes if o.status == "trained"} & before.keys()
    assert not trained_again, f"trained again: {sorted(str(k) for k in trained_again)}"
    after = _published(registry, keys)
    for key in keys:
        history = after[key]
        assert len(history) == 1, f"{key} published {len(history)} times"
        assert "production" in history[0].aliases, f"{key} left out of production"
        if key in before:  # published by the killed job: never trained again
            assert history[0].run_id == before[key][0].run_id != rerun.job_id
    registry.close()
