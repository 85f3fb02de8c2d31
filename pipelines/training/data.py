"""Per-user training data: JSONL or Parquet files (local or s3://), every row validated.

Files are read with pyarrow — one code path for local disks and S3, streamed in batches — and
JSONL line by line, so a row with a wrong type or bad JSON is reported with its line number
instead of failing the whole file (the `datasets` JSON loader raises on mixed column types and
loses line numbers on blank lines). A bad row is named by file and line (JSONL, 1-based) or row
(Parquet, 1-based); the caller decides whether to refuse the job or skip them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from prefixfleet.pipelines.training.errors import JobError
from prefixfleet.registry.errors import InvalidUserKey
from prefixfleet.registry.keys import UserKey
from prefixfleet.workers.data import Example, data_fingerprint
from prefixfleet.workers.errors import BadExample

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
SPLITS = ("train", "eval")
_STRING_FIELDS = ("user_id", "namespace", "split")


class DataError(JobError):
    """The data cannot be used: unreadable input, or bad rows without --skip-bad-rows."""

    def __init__(self, message: str, bad_rows: list[BadRow] | None = None) -> None:
        super().__init__(message)
        self.bad_rows = bad_rows or []


@dataclass(frozen=True)
class BadRow:
    where: str  # "data.jsonl:12" (line) or "data.parquet:row 7"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class UserData:
    """One user's examples. An empty `eval` means no explicit split: a per-user hold-out is taken."""

    key: UserKey
    train: list[Example] = field(default_factory=list)
    eval: list[Example] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """Order-independent over the examples; with an explicit split the split is part of it."""
        if not self.eval:
            return data_fingerprint(self.train)
        both = f"train:{data_fingerprint(self.train)}\neval:{data_fingerprint(self.eval)}"
        return hashlib.sha256(both.encode()).hexdigest()


@dataclass
class TrainingData:
    users: dict[UserKey, UserData]  # in first-seen order
    rows_read: int
    bad_rows: list[BadRow]
    files: list[str]

    @property
    def rows_used(self) -> int:
        return self.rows_read - len(self.bad_rows)


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and path; S3 honours AWS_ENDPOINT_URL (MinIO, Ceph, moto, …)."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        if endpoint:
            ep = urlparse(endpoint)
            options.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
        return pafs.S3FileSystem(**options), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(parsed.path if parsed.scheme else uri)
    raise DataError(f"unsupported data location {uri!r}: use a local path or s3://bucket/key")


def _display(uri: str, fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def list_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The data files at `uri`: the file itself, or every JSONL/Parquet file under a folder."""
    fs, path = _filesystem(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"no such data file or folder: {uri}")
        if info.type == pafs.FileType.File:
            if not path.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
                raise DataError(f"{uri}: unknown data format; expected {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}")
            return fs, [path]
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise DataError(f"cannot read {uri}: {exc}") from exc
    files = sorted(e.path for e in entries if e.type == pafs.FileType.File
                   and e.path.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES))
    if not files:
        raise DataError(f"no {' / '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)} files under {uri}")
    return fs, files


def _jsonl_rows(fs: pafs.FileSystem, path: str, name: str) -> Iterator[tuple[str, object]]:
    """Lines end at newline bytes only (JSON Lines; a CRLF ending is stripped), each decoded
    strictly: a byte that is not UTF-8 makes its row bad rather than U+FFFD in someone's text.
    A byte-order mark opening the file is skipped."""
    with fs.open_input_stream(path, compression="detect") as stream:
        for number, raw in enumerate(io.BufferedReader(stream), 1):
            where = f"{name}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield where, BadRow(where, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except RecursionError:
                yield where, BadRow(where, "not valid JSON (nested too deeply)")
            except ValueError as exc:
                yield where, BadRow(where, f"not valid JSON ({exc})")


def _parquet_rows(fs: pafs.FileSystem, path: str, name: str) -> Iterator[tuple[str, object]]:
    with fs.open_input_file(path) as handle:
        number = 0
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                number += 1
                yield f"{name}:row {number}", row


def parse_row(where: str, row: object, default_namespace: str) -> tuple[UserKey, str | None, Example] | BadRow:
    """A validated (user key, split, example), or the reason the row is bad."""
    if isinstance(row, BadRow):
        return row
    if not isinstance(row, dict):
        return BadRow(where, f"expected a JSON object, got {type(row).__name__}")
    if row.get("user_id") is None:
        return BadRow(where, "missing field 'user_id'")
    for name in _STRING_FIELDS:
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            return BadRow(where, f"field {name!r} must be a string, got {type(value).__name__}")
    split = row.get("split")
    if split is not None and split not in SPLITS:
        return BadRow(where, f"unknown split {split!r}; expected 'train' or 'eval'")
    try:
        key = UserKey(row.get("namespace") or default_namespace, row["user_id"])
    except InvalidUserKey as exc:
        return BadRow(where, str(exc))
    if row.get("text") is None and row.get("prompt") is None and row.get("completion") is None:
        return BadRow(where, "missing field: need 'text', or 'prompt' and 'completion'")
    try:
        example = Example(prompt=row.get("prompt"), completion=row.get("completion"), text=row.get("text"))
    except BadExample as exc:
        return BadRow(where, str(exc))
    return key, split, example


def read_data(uri: str, default_namespace: str = "default") -> TrainingData:
    """Read and validate every row, grouped by user in first-seen order."""
    fs, files = list_files(uri)
    users: dict[UserKey, UserData] = {}
    bad: list[BadRow] = []
    rows = 0
    for path in files:
        name = _display(uri, fs, path)
        reader = _parquet_rows if path.endswith(PARQUET_SUFFIXES) else _jsonl_rows
        try:
            for where, raw in reader(fs, path, name):
                rows += 1
                parsed = parse_row(where, raw, default_namespace)
                if isinstance(parsed, BadRow):
                    bad.append(parsed)
                    continue
                key, split, example = parsed
                user = users.setdefault(key, UserData(key))
                (user.eval if split == "eval" else user.train).append(example)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"cannot read {name}: {exc}") from exc
    return TrainingData(users=users, rows_read=rows, bad_rows=bad, files=[_display(uri, fs, f) for f in files])
