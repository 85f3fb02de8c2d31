"""What a job keeps in the driver is bounded whatever the number of users and bad rows: per-user
rows stream to the run's Parquet table and to --per-user-out, --json carries counts only past the
kept outcomes, and bad rows past the first ones are counted, not listed. Embedded registry, real
MLflow tracking store, local Ray."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from prefixfleet.pipelines.training import tally
from prefixfleet.pipelines.training.ingest import BAD_ROWS_KEPT
from prefixfleet.registry import Registry, UserKey
from tests.fixtures.backbones import TinyBackbones
from tests.pipelines.pipeline_support import BACKBONE, STEPS, cli, synthetic, write_jsonl

pytestmark = pytest.mark.ray
USERS = 3


@pytest.fixture(scope="module")
def backbone(tiny_backbones: TinyBackbones, local_ray: None) -> str:
    return tiny_backbones.path(**BACKBONE)


def test_per_user_rows_stream_to_the_run_table_and_the_out_file_past_the_kept_ones(
        backbone: str, local_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tally, "KEPT", USERS - 1)  # the driver keeps fewer outcomes than the job has users
    data = write_jsonl(tmp_path / "data.jsonl", synthetic(USERS))
    out = tmp_path / "per_user.jsonl"
    result = cli("train", str(data), "--backbone", backbone, "--steps", str(STEPS), "--actors", "1",
                 "--per-user-out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["users"]["trained"] == USERS
    assert (summary["per_user"], summary["per_user_rows"], summary["per_user_truncated"]) == ([], USERS, True)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    users = {f"user-{i:05d}" for i in range(USERS)}
    assert {r["user_id"] for r in rows} == users and all(r["status"] == "trained" for r in rows)

    registry = Registry.from_env()
    client = MlflowClient(registry.tracking_uri)
    table = pq.read_table(client.download_artifacts(summary["job_id"], "per_user.parquet")).to_pylist()
    assert sorted(r["user"] for r in table) == sorted(registry.pseudonym(UserKey("default", u)) for u in users)
    assert {r["version"] for r in table} == {1} and not any(u in json.dumps(table) for u in users)
    preview = json.loads(Path(client.download_artifacts(summary["job_id"], "per_user.json")).read_text())
    assert len(preview["data"]) == USERS - 1  # the kept ones: what the MLflow UI shows as a table


def test_bad_rows_past_the_first_ones_are_counted_not_listed(backbone: str, local_env: dict[str, str],
                                                             tmp_path: Path) -> None:
    bad = BAD_ROWS_KEPT + 30
    data = write_jsonl(tmp_path / "data.jsonl", [*synthetic(1), *({"user_id": f"u{i}"} for i in range(bad))])
    result = cli("train", str(data), "--backbone", backbone, "--steps", str(STEPS))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    listed = [line for line in lines if line.startswith("bad row ")]
    assert len(listed) == BAD_ROWS_KEPT and listed[0].startswith(f"bad row {data}:{len(synthetic(1)) + 1}: ")
    assert f"… and {bad - BAD_ROWS_KEPT} more bad rows" in lines
    assert lines[-1].startswith(f"error: {bad} bad row(s)")


@pytest.mark.parametrize("server", ["MLflow", "S3"])
def test_a_server_unreachable_at_the_start_ends_the_job_in_seconds_with_one_line(
        server: str, local_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if server == "MLflow":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: refused
    else:
        monkeypatch.setenv("PREFIXFLEET_STORE", "s3://bucket/prefixes")
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    data = write_jsonl(tmp_path / "data.jsonl", synthetic(1))
    started = time.monotonic()
    result = cli("train", str(data), "--backbone", "unused")  # the default outage deadline is minutes
    assert time.monotonic() - started < 10 and result.exit_code == 1
    line, = result.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"error: cannot start the job: {server} unreachable")
