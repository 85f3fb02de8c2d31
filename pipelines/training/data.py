"""Per-user training data: where it is (JSONL or Parquet files, local or s3://, or a Hugging Face
dataset), and every row read and validated on its own.

Nothing here holds a whole input: `shards` lists what there is to read (a file, or a range of a
dataset's rows) and `read_shard` streams one shard's rows, each parsed and validated — the Ray Data
read tasks of `ingest` run it in the workers. JSONL is read line by line, so a row with a wrong
type or bad JSON is reported with its line number instead of failing the whole file (pyarrow's
JSON reader crashes the process on deeply nested rows; the `datasets` JSON loader raises on mixed
column types and loses line numbers on blank lines). A bad row is named by file and line (JSONL,
1-based) or row (Parquet and datasets, 1-based); the job decides whether to refuse or skip them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
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
DATASET_MARKERS = ("dataset_info.json", "state.json")  # a `save_to_disk` folder
DATASET_SHARD_ROWS = 50_000
S3_TIMEOUT_S = 5.0  # an unreachable endpoint fails the job in seconds, not after retries per file
_STRING_FIELDS = ("user_id", "namespace", "split")


class DataError(JobError):
    """The data cannot be used: unreadable input, or bad rows without --skip-bad-rows.
    `bad_rows` holds the first ones; `bad_count` counts them all."""

    def __init__(self, message: str, bad_rows: list[BadRow] | None = None, bad_count: int | None = None) -> None:
        super().__init__(message)
        self.bad_rows = bad_rows or []
        self.bad_count = len(self.bad_rows) if bad_count is None else bad_count


@dataclass(frozen=True)
class BadRow:
    where: str  # "data.jsonl:12" (line) or "data.parquet:row 7"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass(frozen=True)
class GoodRow:
    key: UserKey
    split: str | None
    example: Example


@dataclass
class UserData:
    """One user's examples. An empty `eval` means no explicit split: a per-user hold-out is taken."""

    key: UserKey
    train: list[Example] = field(default_factory=list)
    eval: list[Example] = field(default_factory=list)

    @cached_property
    def fingerprint(self) -> str:
        """Order-independent over the examples; with an explicit split the split is part of it.
        Computed once: read it after the last example is added."""
        if not self.eval:
            return data_fingerprint(self.train)
        both = f"train:{data_fingerprint(self.train)}\neval:{data_fingerprint(self.eval)}"
        return hashlib.sha256(both.encode()).hexdigest()


@dataclass(frozen=True)
class Shard:
    """One read task's input: a whole file, or rows [start, stop) of a Hugging Face dataset
    (`dataset`: a `save_to_disk` folder, or a `datasets.Dataset` — memory-mapped ones pickle as
    their file paths)."""

    name: str  # how bad rows name it
    kind: str  # "jsonl" | "parquet" | "dataset"
    path: str = ""
    fs: pafs.FileSystem | None = None
    size: int = 0  # bytes of a file
    dataset: Any = None
    start: int = 0
    stop: int = 0


def _filesystem(uri: str, credentials: bool) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and path. S3 honours AWS_ENDPOINT_URL (MinIO, Ceph, moto, …); with
    `credentials`, this process's go with it to the read tasks, else each node finds its own."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        env = os.environ.get
        options: dict = {"region": env("AWS_REGION") or env("AWS_DEFAULT_REGION") or "us-east-1",
                         "connect_timeout": S3_TIMEOUT_S, "request_timeout": S3_TIMEOUT_S,
                         "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2)}
        if endpoint := env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"):
            ep = urlparse(endpoint)
            options.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
        if credentials and env("AWS_ACCESS_KEY_ID") and env("AWS_SECRET_ACCESS_KEY"):
            options.update(access_key=env("AWS_ACCESS_KEY_ID"), secret_key=env("AWS_SECRET_ACCESS_KEY"),
                           session_token=env("AWS_SESSION_TOKEN"))
        return pafs.S3FileSystem(**options), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(parsed.path if parsed.scheme else uri)
    raise DataError(f"unsupported data location {uri!r}: use a local path or s3://bucket/key")


def _file_shard(fs: pafs.FileSystem, info: pafs.FileInfo) -> Shard:
    name = f"s3://{info.path}" if isinstance(fs, pafs.S3FileSystem) else info.path
    return Shard(name, "parquet" if info.path.endswith(PARQUET_SUFFIXES) else "jsonl", info.path, fs, info.size or 0)


def _dataset_shards(dataset: Any, name: str, rows: int) -> list[Shard]:
    return [Shard(name, "dataset", dataset=dataset, start=start, stop=min(rows, start + DATASET_SHARD_ROWS))
            for start in range(0, rows, DATASET_SHARD_ROWS)]


def shards(source: Any, credentials: bool = True) -> list[Shard]:
    """What there is to read at `source`: a data file, a folder of JSONL/Parquet files (local or
    s3://), a `save_to_disk` folder, or a `datasets.Dataset`. `credentials`: whether the S3
    credentials of this process go with the shards (on one machine; a cluster's nodes use theirs)."""
    if not isinstance(source, str):
        if not hasattr(source, "with_format"):
            raise DataError(f"cannot read training data from a {type(source).__name__}: "
                            "give a path, an s3:// URI or a datasets.Dataset")
        return _dataset_shards(source, "dataset", len(source))
    fs, path = _filesystem(source, credentials)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"no such data file or folder: {source}")
        if info.type == pafs.FileType.File:
            if not path.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
                raise DataError(f"{source}: unknown data format; expected {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}")
            return [_file_shard(fs, info)]
        if isinstance(fs, pafs.LocalFileSystem) and all(os.path.isfile(os.path.join(path, m)) for m in DATASET_MARKERS):
            import datasets

            return _dataset_shards(path, path, len(datasets.load_from_disk(path)))  # memory-mapped
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise DataError(f"cannot read {source}: {' '.join(str(exc).split())}") from exc
    files = sorted((e for e in entries if e.type == pafs.FileType.File
                    and e.path.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)), key=lambda e: e.path)
    if not files:
        raise DataError(f"no {' / '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)} files under {source}")
    return [_file_shard(fs, f) for f in files]


def _jsonl_rows(shard: Shard) -> Iterator[tuple[int, str, object]]:
    """Lines end at newline bytes only (JSON Lines; a CRLF ending is stripped), each decoded
    strictly: a byte that is not UTF-8 makes its row bad rather than U+FFFD in someone's text.
    A byte-order mark opening the file is skipped."""
    with shard.fs.open_input_stream(shard.path, compression="detect") as stream:
        for number, raw in enumerate(io.BufferedReader(stream), 1):
            where = f"{shard.name}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield number, where, BadRow(where, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield number, where, json.loads(line)
            except RecursionError:
                yield number, where, BadRow(where, "not valid JSON (nested too deeply)")
            except ValueError as exc:
                yield number, where, BadRow(where, f"not valid JSON ({exc})")


def _parquet_rows(shard: Shard) -> Iterator[tuple[int, str, object]]:
    with shard.fs.open_input_file(shard.path) as handle:
        number = 0
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                number += 1
                yield number, f"{shard.name}:row {number}", row


def _dataset_rows(shard: Shard) -> Iterator[tuple[int, str, object]]:
    dataset = shard.dataset
    if isinstance(dataset, str):
        import datasets

        dataset = datasets.load_from_disk(dataset)
    table: pa.Table = dataset.with_format("arrow")[shard.start:shard.stop]
    for number, row in enumerate(table.to_pylist(), shard.start + 1):
        yield number, f"{shard.name}:row {number}", row


_READERS = {"jsonl": _jsonl_rows, "parquet": _parquet_rows, "dataset": _dataset_rows}


def read_shard(shard: Shard, default_namespace: str) -> Iterator[tuple[int, GoodRow | BadRow]]:
    """(row number, the row validated or the reason it is bad) for every non-blank row;
    DataError when the shard itself cannot be read."""
    try:
        for number, where, raw in _READERS[shard.kind](shard):
            yield number, parse_row(where, raw, default_namespace)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read {shard.name}: {' '.join(str(exc).split())}") from exc


def parse_row(where: str, row: object, default_namespace: str) -> GoodRow | BadRow:
    """The validated row, or the reason it is bad."""
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
    return GoodRow(key, split, example)
