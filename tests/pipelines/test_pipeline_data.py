"""Reading training data: every bad row named by file and line (or Parquet row), grouping by
(namespace, user), the split column, folders, and s3:// through a real S3-compatible server."""
from __future__ import annotations

import json
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefixfleet.pipelines.training.data import DataError, UserData, read_data
from prefixfleet.registry import UserKey
from prefixfleet.workers.data import Example

GOOD = {"user_id": "ann", "prompt": "order 2 mugs\n", "completion": "Hi Ann - 2 mugs. Thanks!"}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_named_by_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.jsonl", [
        json.dumps(GOOD),
        "",  # blank lines are skipped and do not shift line numbers
        json.dumps({"prompt": "p", "completion": "c"}),
        json.dumps({**GOOD, "prompt": 5}),
        json.dumps({"user_id": "bob", "text": "   "}),
        json.dumps({**GOOD, "split": "test"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"user_id": "bob"}),
        json.dumps({"user_id": "bad\u0007id", "text": "hello"}),
        json.dumps({**GOOD, "namespace": "Not/A/Namespace"}),
        json.dumps({"user_id": 7, "text": "hello"}),
    ])
    data = read_data(str(path))
    where = {b.where.rsplit(":", 1)[1]: b.reason for b in data.bad_rows}
    assert all(b.where.startswith(str(path)) for b in data.bad_rows)
    assert set(where) == {"3", "4", "5", "6", "7", "8", "9", "10", "11", "12"}
    assert "user_id" in where["3"]
    assert "'prompt' must be a string, got int" in where["4"]
    assert "empty" in where["5"]
    assert "unknown split 'test'" in where["6"]
    assert "not valid JSON" in where["7"]
    assert "JSON object" in where["8"]
    assert "need 'text', or 'prompt' and 'completion'" in where["9"]
    assert "control" in where["10"]
    assert "namespace" in where["11"].lower()
    assert "'user_id' must be a string" in where["12"]
    assert data.rows_read == 11 and data.rows_used == 1
    assert list(data.users) == [UserKey("default", "ann")]


def test_rows_group_by_namespace_and_user_and_honour_split(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.jsonl", [
        json.dumps(GOOD),
        json.dumps({**GOOD, "completion": "Hi Ann - more. Thanks!", "split": "eval"}),
        json.dumps({**GOOD, "namespace": "acme"}),
        json.dumps({"user_id": "bob", "text": "plain text example", "split": "train"}),
    ])
    data = read_data(str(path), default_namespace="shop")
    assert list(data.users) == [UserKey("shop", "ann"), UserKey("acme", "ann"), UserKey("shop", "bob")]
    ann = data.users[UserKey("shop", "ann")]
    assert ann.key == UserKey("shop", "ann") and len(ann.train) == 1 and len(ann.eval) == 1
    assert data.users[UserKey("acme", "ann")].eval == []


def test_fingerprint_ignores_order_and_sees_the_split() -> None:
    a, b = Example(prompt="p", completion="one"), Example(prompt="p", completion="two")
    assert UserData(UserKey("ns", "u"), [a, b]).fingerprint == UserData(UserKey("ns", "u"), [b, a]).fingerprint
    assert UserData(UserKey("ns", "u"), [a, b]).fingerprint != UserData(UserKey("ns", "u"), [a], [b]).fingerprint
    assert UserData(UserKey("ns", "u"), [a], [b]).fingerprint != UserData(UserKey("ns", "u"), [b], [a]).fingerprint


def test_parquet_rows_and_folders(tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    folder.mkdir()
    table = pa.table({"user_id": ["ann", None, "cy"], "prompt": ["p", "p", "p"],
                      "completion": ["c1", "c2", ""], "split": [None, None, "eval"]})
    pq.write_table(table, folder / "part-0.parquet")
    _write(folder / "part-1.jsonl", [json.dumps({**GOOD, "user_id": "dan"})])
    (folder / "README.txt").write_text("ignored")
    data = read_data(str(folder))
    assert [str(b) for b in data.bad_rows] == [
        f"{folder / 'part-0.parquet'}:row 2: missing field 'user_id'",
        f"{folder / 'part-0.parquet'}:row 3: `completion` must be a non-empty string next to `prompt`",
    ]
    assert list(data.users) == [UserKey("default", "ann"), UserKey("default", "dan")]
    assert len(data.files) == 2


def test_unreadable_inputs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        read_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unknown data format"):
        read_data(str(_write(tmp_path / "data.csv", ["a,b"])))
    with pytest.raises(DataError, match="no .jsonl"):
        read_data(str(tmp_path))


def test_reads_from_s3(s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    body = "\n".join([json.dumps(GOOD), json.dumps({"user_id": "bob"})]) + "\n"
    client.put_object(Bucket=s3_bucket, Key="pipeline-data/day1/part.jsonl", Body=body.encode())
    data = read_data(f"s3://{s3_bucket}/pipeline-data/day1")
    assert data.files == [f"s3://{s3_bucket}/pipeline-data/day1/part.jsonl"]
    assert [str(b) for b in data.bad_rows] == [
        f"s3://{s3_bucket}/pipeline-data/day1/part.jsonl:2: missing field: need 'text', or 'prompt' and 'completion'"]
    assert list(data.users) == [UserKey("default", "ann")]
