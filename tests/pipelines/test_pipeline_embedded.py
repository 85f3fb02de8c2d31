"""`prefixfleet train` and `demo` on the embedded defaults (sqlite MLflow + file:// store under
--home) and local Ray: counts, the JSON summary, the MLflow job run, re-runs publishing nothing,
and bad rows refused with file and line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from prefixfleet.registry import Registry, UserKey
from tests.fixtures.backbones import TinyBackbones
from tests.pipelines.pipeline_support import BACKBONE, STEPS, cli, synthetic, write_jsonl

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def backbone(tiny_backbones: TinyBackbones, local_ray: None) -> str:
    return tiny_backbones.path(**BACKBONE)


def test_train_then_rerun_publishes_nothing(backbone: str, local_env: dict[str, str], tmp_path: Path) -> None:
    rows = synthetic(3)
    data = write_jsonl(tmp_path / "data.jsonl", [*rows[:5], {"user_id": "x", "text": ""}, *rows[5:]])
    args = ["train", str(data), "--backbone", backbone, "--steps", str(STEPS), "--actors", "1"]

    refused = cli(*args)
    assert refused.exit_code == 2
    assert f"bad row {data}:6: `text` is empty" in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: 1 bad row(s)")

    first = cli(*args, "--skip-bad-rows", "--mode", "isolated", "--json")
    assert first.exit_code == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["rows"] == {"read": len(rows) + 1, "skipped": 1, "used": len(rows)}
    assert summary["users"] == {"read": 3, "trained": 3, "skipped": 0, "failed": 0, "promoted": 3}
    registry = Registry.from_env()
    for user in summary["per_user"]:
        assert user["eval_loss"] < user["baseline_eval_loss"] and user["promoted"]
        ref = registry.resolve(UserKey("default", user["user_id"]), "production")
        assert (ref.version, ref.sha256, ref.run_id) == (user["version"], user["sha256"], summary["job_id"])

    run = MlflowClient(registry.tracking_uri).get_run(summary["job_id"])
    assert run.data.params["mode"] == "isolated" and run.data.metrics["users_trained"] == 3
    artifacts = {a.path for a in MlflowClient(registry.tracking_uri).list_artifacts(summary["job_id"])}
    assert {"per_user.json", "loss_curves.png", "summary.json"} <= artifacts

    again = cli(*args, "--skip-bad-rows", "--json")
    assert again.exit_code == 0, again.stderr
    rerun = json.loads(again.stdout)
    assert rerun["users"]["trained"] == 0 and rerun["users"]["skipped"] == 3 and rerun["per_user"] == []
    for user in summary["per_user"]:
        assert len(registry.history(UserKey("default", user["user_id"]))) == 1


def test_demo_shows_each_users_style_in_the_loss_and_in_the_text(local_env: dict[str, str], local_ray: None) -> None:
    result = cli("demo", "--users", "10", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["own_lowest"] and report["styled"] and report["job"]["users"]["trained"] == 10
    assert report["style_shares"]["own"] >= 0.8
    assert max(report["style_shares"]["none"], report["style_shares"]["other"]) <= 0.2
    assert len(report["users"]) == 10
    for row in report["users"]:
        assert row["loss_own_prefix"] < row["loss_other_prefix"] and row["loss_own_prefix"] < row["loss_no_prefix"]
        assert row["prompt"].startswith("order ") and row["generated"] != row["generated_other_prefix"]


def test_demo_needs_ten_users(local_env: dict[str, str]) -> None:
    result = cli("demo", "--users", "3")
    assert result.exit_code == 2 and "--users must be at least 10, got 3" in result.stderr


def test_outage_deadline_must_be_positive(local_env: dict[str, str], tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", synthetic(1))
    result = cli("train", str(data), "--backbone", "unused", "--outage-deadline", "0")
    assert result.exit_code == 2 and "--outage-deadline must be a positive number of seconds" in result.stderr


def test_init_and_reparam_flags_reach_the_published_spec(backbone: str, local_env: dict[str, str],
                                                         tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", synthetic(1))
    args = ["train", str(data), "--backbone", backbone, "--steps", str(STEPS), "--actors", "1"]
    for flags, message in ((["--init", "words"], "--init must be random or text:"),
                           (["--init", "text:"], "--init text: needs the text after the colon"),
                           (["--method", "prompt", "--reparam-hidden", "8"], "--reparam-hidden sizes the MLP")):
        refused = cli(*args, *flags)
        assert refused.exit_code == 2 and message in refused.stderr, flags
    trained = cli(*args, "--init", "text:Dear customer", "--reparam-hidden", "16", "--json")
    assert trained.exit_code == 0, trained.stderr
    user, = json.loads(trained.stdout)["per_user"]
    ref = Registry.from_env().resolve(UserKey("default", user["user_id"]), version=user["version"])
    assert ref.spec["init_text"] == "Dear customer" and ref.spec["reparam_hidden"] == 16
