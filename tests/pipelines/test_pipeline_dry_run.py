"""`train --dry-run` and `retrain --dry-run`: each user's plan (train, skip, refuse) printed as it is
decided, bad rows reported instead of refusing the job, and nothing trained or written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from prefixfleet.registry import Registry
from tests.fixtures.backbones import TinyBackbones
from tests.pipelines.pipeline_support import BACKBONE, STEPS, cli, restyled, synthetic, write_jsonl

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def backbone(tiny_backbones: TinyBackbones, local_ray: None) -> str:
    return tiny_backbones.path(**BACKBONE)


def _plans(stdout: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in stdout.splitlines()]
    return {p["user_id"]: p for p in lines[:-1]} | {"": lines[-1]}


def test_dry_runs_plan_without_writing_then_follow_what_is_published(
        backbone: str, local_env: dict[str, str], tmp_path: Path) -> None:
    rows = synthetic(3)
    users = sorted({r["user_id"] for r in rows})
    data = write_jsonl(tmp_path / "data.jsonl", [*rows, {"user_id": "x", "text": ""}, {"user_id": "y", "split": "eval",
                                                                                       "text": "only eval"}])
    args = ["--backbone", backbone, "--steps", str(STEPS), "--actors", "1"]  # one actor starts soonest on 2 cores

    planned = cli("train", str(data), *args, "--dry-run")
    assert planned.exit_code == 0, planned.stderr
    lines = planned.stdout.splitlines()
    assert sorted(lines[:4]) == sorted([*(f"train  default/{u}: new data" for u in users),
                                        "refuse default/y: no training rows (1 rows, all split 'eval')"])
    assert "would train 3, skip 0, refuse 1" in lines[4]
    assert lines[5] == "the job would refuse to start: 1 bad rows (fix them or pass --skip-bad-rows)"
    assert f"{data}:{len(rows) + 1}: `text` is empty" in planned.stderr
    registry = Registry.from_env()
    assert list(registry.list_users("default")) == []
    client = MlflowClient(registry.tracking_uri)
    assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]

    trained = cli("train", str(data), *args, "--skip-bad-rows", "--json")
    assert trained.exit_code == 1  # y has no training rows
    assert json.loads(trained.stdout)["users"]["trained"] == 3

    again = cli("train", str(data), *args, "--skip-bad-rows", "--dry-run", "--json")
    assert again.exit_code == 0, again.stderr
    plans = _plans(again.stdout)
    assert {u: plans[u]["plan"] for u in users} == dict.fromkeys(users, "skip")
    assert plans[users[0]]["reason"] == "already published as version 1 (production)"
    assert plans[""]["dry_run"] and plans[""]["users"] == {"read": 4, "planned": 0, "skipped": 3, "failed": 1}

    changed = write_jsonl(tmp_path / "changed.jsonl", restyled(rows, users[0], 1))
    nightly = _plans(cli("retrain", str(changed), *args, "--dry-run", "--json").stdout)
    assert (nightly[users[0]]["plan"], nightly[users[0]]["version"]) == ("train", 1)
    assert nightly[users[0]]["reason"] == "data changed since production version 1"
    assert [nightly[u]["plan"] for u in users[1:]] == ["skip", "skip"]
    assert [len(registry.history(k)) for k in registry.list_users("default")] == [1, 1, 1]
