"""Reading training data through the job's Ray Data ingest: every bad row named by file and line
(or Parquet or dataset row), grouping by (namespace, user), the split column, folders, Hugging Face
datasets (a `save_to_disk` folder and a `datasets.Dataset`), and s3:// through a real
S3-compatible server."""
from __future__ import annotations

import json
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefixfleet.pipelines.training.data import DataError, UserData
from prefixfleet.registry import UserKey
from prefixfleet.workers.data import Example
from tests.fixtures.reading import Read, ingest_all

pytestmark = pytest.mark.ray

GOOD = {"user_id": "ann", "prompt": "order 2 mugs\n", "completion": "Hi Ann - 2 mugs. Thanks!"}


def read_data(source: object, default_namespace: str = "default") -> Read:
    _, read = ingest_all(source, default_namespace)
    return read


@pytest.fixture(autouse=True)
def _ray(local_ray: None) -> None:
    """Every test here reads through Ray Data."""


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
    assert data.rows_read == 11 and data.rows_read - len(data.bad_rows) == 1
    assert list(data.users) == [UserKey("default", "ann")]


def test_rows_group_by_namespace_and_user_and_honour_split(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.jsonl", [
        json.dumps(GOOD),
        json.dumps({**GOOD, "completion": "Hi Ann - more. Thanks!", "split": "eval"}),
        json.dumps({**GOOD, "namespace": "acme"}),
        json.dumps({"user_id": "bob", "text": "plain text example", "split": "train"}),
    ])
    data = read_data(str(path), default_namespace="shop")
    assert set(data.users) == {UserKey("shop", "ann"), UserKey("acme", "ann"), UserKey("shop", "bob")}
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
    assert set(data.users) == {UserKey("default", "ann"), UserKey("default", "dan")}


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
    ingested, data = ingest_all(f"s3://{s3_bucket}/pipeline-data/day1")
    assert ingested.files == [f"s3://{s3_bucket}/pipeline-data/day1/part.jsonl"]
    assert [str(b) for b in data.bad_rows] == [
        f"s3://{s3_bucket}/pipeline-data/day1/part.jsonl:2: missing field: need 'text', or 'prompt' and 'completion'"]
    assert list(data.users) == [UserKey("default", "ann")]


def test_hugging_face_datasets_on_disk_and_in_memory(tmp_path: Path) -> None:
    import datasets

    rows = [{**GOOD, "split": None}, {**GOOD, "user_id": "bob", "split": "eval"}, {**GOOD, "user_id": None, "split": None},
            {**GOOD, "user_id": "bob", "split": None}]
    dataset = datasets.Dataset.from_list(rows)
    dataset.save_to_disk(str(tmp_path / "saved"))
    for source, name in ((str(tmp_path / "saved"), str(tmp_path / "saved")), (dataset, "dataset")):
        data = read_data(source)
        assert [str(b) for b in data.bad_rows] == [f"{name}:row 3: missing field 'user_id'"]
        assert data.rows_read == 4
        bob = data.users[UserKey("default", "bob")]
        assert (len(bob.train), len(bob.eval)) == (1, 1)
    with pytest.raises(DataError, match="cannot read training data from a list"):
        read_data(rows)


def test_unreachable_s3_fails_in_seconds_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    started = time.monotonic()
    with pytest.raises(DataError, match="cannot read s3://bucket/data") as error:
        read_data("s3://bucket/data")
    assert time.monotonic() - started < 10 and "\n" not in str(error.value)


def test_users_stay_whole_across_many_buckets_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefixfleet.pipelines.training import ingest
    from tests.fixtures.reading import parse

    monkeypatch.setattr(ingest, "ROWS_PER_BUCKET", 20)  # about ten buckets
    for part in range(3):
        _write(tmp_path / f"part-{part}.jsonl",
               [json.dumps({"user_id": f"u{user}", "text": f"row {part}.{row} of u{user}", "split": split})
                for user in range(40) for row, split in enumerate(["train", "train", "eval"])])
    data, read = ingest_all(str(tmp_path))
    assert data.user_count == 40 and data.rows_read == 360
    expected = parse(str(tmp_path)).users
    for key, user in read.users.items():
        assert (len(user.train), len(user.eval)) == (6, 3) and user.fingerprint == expected[key].fingerprint
