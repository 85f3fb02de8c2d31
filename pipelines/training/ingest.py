"""Streaming ingest on Ray Data: rows parsed and validated in Ray workers, users grouped by hash bucket.

Read tasks of our own datasource (`RowsDatasource`, one per file or range of dataset rows) run
`data.read_shard`, so every bad row keeps its file and line. Users are hash-partitioned into
buckets of about ROWS_PER_BUCKET rows; one `groupby("bucket").map_groups` call per bucket groups
its users and emits one row per user (the user's examples, pickled) plus one statistics row. The
result is materialized in Ray's object store (spilled to disk past its size), and the driver
reads only the statistics: row counts, the first BAD_ROWS_KEPT bad rows, namespaces and users.

Why buckets and not a groupby on the user key: the user key makes one `map_groups` call, and one
group, per user — 31 s against 15 s for 4M rows here (BENCHMARKS.md) and the aggregator cost
grows with the number of groups (ray#58734, ray#61016). Hashing keeps buckets even (no skew:
ray#45303) and each fits on one node whatever the number of users. The shuffle is Ray Data's
sort-based one: its tasks start in about a second where the hash shuffle's aggregator actors take
eight, and it was faster at 4M rows too (11.6 s against 14.7 s).
"""
from __future__ import annotations

import heapq
import logging
import math
import pickle
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.context import ShuffleStrategy
from ray.data.datasource import Datasource, ReadTask
from ray.data.expressions import col
from ray.exceptions import RayError

from prefixfleet.pipelines.cluster import only_this_machine
from prefixfleet.pipelines.training.data import BadRow, DataError, GoodRow, Shard, UserData, read_shard, shards
from prefixfleet.pipelines.training.errors import JobError
from prefixfleet.registry import UserKey
from prefixfleet.workers.data import Example

log = logging.getLogger("prefixfleet")
ROWS_PER_BUCKET = 50_000
BAD_ROWS_KEPT = 100  # in full; the others are counted
BATCH_ROWS = 32_768
BYTES_PER_ROW_GUESS = 100  # sizes a file's rows before reading it: a short guess makes more, smaller buckets
SLOTS = 1 << 31
FREE_CPU_WAIT_S = 10.0

ROW_SCHEMA = pa.schema([
    ("shard", pa.int32()), ("number", pa.int64()), ("slot", pa.int64()), ("namespace", pa.string()),
    ("user_id", pa.string()), ("split", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
    ("text", pa.string()), ("where", pa.string()), ("error", pa.string()),
])
BAD_TYPE = pa.struct([("shard", pa.int32()), ("number", pa.int64()), ("where", pa.string()), ("reason", pa.string())])
USER_SCHEMA = pa.schema([
    ("kind", pa.string()), ("namespace", pa.string()), ("user_id", pa.string()), ("rows", pa.int64()),
    ("payload", pa.binary()), ("bad_count", pa.int64()),
    ("namespaces", pa.list_(pa.string())), ("bad", pa.list_(BAD_TYPE)),
])
USER, STATS = "user", "stats"


def slot_of(key: UserKey) -> int:
    return zlib.crc32(f"{key.namespace}\0{key.user_id}".encode()) % SLOTS


def _row(index: int, number: int, parsed: GoodRow | BadRow) -> dict[str, Any]:
    if isinstance(parsed, BadRow):  # spread over buckets by position
        return {"shard": index, "number": number, "slot": zlib.crc32(f"{index}:{number}".encode()) % SLOTS,
                "where": parsed.where, "error": parsed.reason}
    example = parsed.example
    return {"shard": index, "number": number, "slot": slot_of(parsed.key), "namespace": parsed.key.namespace,
            "user_id": parsed.key.user_id, "split": parsed.split, "prompt": example.prompt,
            "completion": example.completion, "text": example.text}


def _read(index: int, shard: Shard, namespace: str) -> Iterator[pa.Table]:
    if isinstance(shard.dataset, ray.ObjectRef):
        shard = replace(shard, dataset=ray.get(shard.dataset))
    batch: list[dict[str, Any]] = []
    for number, parsed in read_shard(shard, namespace):
        batch.append(_row(index, number, parsed))
        if len(batch) == BATCH_ROWS:
            yield pa.Table.from_pylist(batch, schema=ROW_SCHEMA)
            batch = []
    yield pa.Table.from_pylist(batch, schema=ROW_SCHEMA)


class RowsDatasource(Datasource):
    """One read task per shard; each yields parsed rows in batches of BATCH_ROWS."""

    def __init__(self, shards: list[Shard], namespace: str) -> None:
        self.shards, self.namespace = shards, namespace

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(partial(_read, index, shard, self.namespace),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[shard.name]))
                for index, shard in enumerate(self.shards)]


def _group_bucket(table: pa.Table) -> pa.Table:
    """One bucket's rows → one row per user (examples in file order) and one statistics row."""
    bad_mask = pc.is_valid(table.column("error"))
    bad = table.filter(bad_mask).sort_by([("shard", "ascending"), ("number", "ascending")])
    good = table.filter(pc.invert(bad_mask)).sort_by(
        [("namespace", "ascending"), ("user_id", "ascending"), ("shard", "ascending"), ("number", "ascending")])
    out: dict[str, list] = {name: [] for name in USER_SCHEMA.names}

    def emit(**values: Any) -> None:
        for name in out:
            out[name].append(values.get(name))

    rows = good.select(["namespace", "user_id", "split", "prompt", "completion", "text"]).to_pylist()
    user: UserData | None = None
    count = 0
    for row in rows + [None]:
        if user is not None and (row is None or (row["namespace"], row["user_id"]) != (user.key.namespace, user.key.user_id)):
            _ = user.fingerprint  # computed here, once: cached, it travels in the pickle to the actor's plan
            emit(kind=USER, namespace=user.key.namespace, user_id=user.key.user_id, rows=count,
                 payload=pickle.dumps(user, protocol=5))
            user = None
        if row is None:
            break
        if user is None:
            user, count = UserData(UserKey(row["namespace"], row["user_id"])), 0
        example = Example(prompt=row["prompt"], completion=row["completion"], text=row["text"])
        (user.eval if row["split"] == "eval" else user.train).append(example)
        count += 1
    emit(kind=STATS, rows=len(table), bad_count=len(bad),
         namespaces=pc.unique(good.column("namespace")).to_pylist(),
         bad=bad.select(["shard", "number", "where", "error"]).slice(0, BAD_ROWS_KEPT)
         .rename_columns(["shard", "number", "where", "reason"]).to_pylist())
    return pa.Table.from_pydict(out, schema=USER_SCHEMA)


@dataclass
class Ingested:
    """The users, grouped and materialized in Ray's object store, and what the driver knows of them."""

    users: ray.data.Dataset  # USER_SCHEMA rows: one per user, one statistics row per bucket
    blocks: list[tuple[ray.ObjectRef, int]]  # its blocks, each with its number of rows (never fetched here)
    user_count: int
    rows_read: int
    bad_count: int
    bad_rows: list[BadRow]  # the first BAD_ROWS_KEPT, in file order
    namespaces: set[str]
    files: list[str]


def _data_error(exc: BaseException) -> BaseException | None:
    """The DataError a read task raised, from inside Ray's wrappers."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DataError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def _wait_for_a_cpu() -> None:
    """Ray Data's tasks take a whole CPU each; actors just stopped free theirs within moments."""
    deadline = time.monotonic() + FREE_CPU_WAIT_S
    while ray.available_resources().get("CPU", 0) < 1:
        if time.monotonic() > deadline:
            raise JobError("reading the data needs a free CPU on the Ray cluster, and every CPU is held "
                           "(by trainer actors?): start fewer actors or add a node")
        time.sleep(0.1)


def _buckets(parts: list[Shard]) -> int:
    rows = sum(s.stop - s.start if s.kind == "dataset" else max(1, s.size // BYTES_PER_ROW_GUESS) for s in parts)
    return max(1, math.ceil(rows / ROWS_PER_BUCKET))


def ingest(source: Any, namespace: str) -> Ingested:
    """Read, validate and group every row of `source` (see `data.shards`) on the Ray cluster."""
    parts = shards(source, credentials=only_this_machine())
    if any(s.kind == "dataset" and not isinstance(s.dataset, str) for s in parts):
        ref = ray.put(parts[0].dataset)  # once in the object store, not once per read task
        parts = [replace(s, dataset=ref) for s in parts]
    _wait_for_a_cpu()
    buckets = _buckets(parts)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    rows = ray.data.read_datasource(RowsDatasource(parts, namespace), override_num_blocks=len(parts))
    width = SLOTS // buckets + 1
    bucketed = rows.add_column("bucket", lambda t: pc.divide(t["slot"], width), batch_format="pyarrow")
    try:
        users = bucketed.groupby("bucket").map_groups(_group_bucket, batch_format="pyarrow").materialize()
        stats = users.filter(expr=col("kind") == STATS).select_columns(
            ["rows", "bad_count", "namespaces", "bad"]).take_all()
    except RayError as exc:
        if (error := _data_error(exc)) is not None:
            raise error from None
        raise JobError(f"reading the data failed: {exc}") from exc
    bad = heapq.nsmallest(BAD_ROWS_KEPT, (b for s in stats for b in s["bad"]), key=lambda b: (b["shard"], b["number"]))
    return Ingested(users=users, blocks=_blocks(users), user_count=users.count() - len(stats),
                    rows_read=sum(s["rows"] for s in stats),
                    bad_count=sum(s["bad_count"] for s in stats), bad_rows=[BadRow(b["where"], b["reason"]) for b in bad],
                    namespaces={n for s in stats for n in s["namespaces"]},
                    files=list(dict.fromkeys(s.name for s in parts)))


@ray.remote(num_cpus=0)
def _rows_in(block: pa.Table) -> int:
    return block.num_rows


def _blocks(users: ray.data.Dataset) -> list[tuple[ray.ObjectRef, int]]:
    """(block, its number of rows) for each block of `users`, without fetching it here. Taken
    while the CPUs are free: Ray Data warns (and may wait) once trainer actors hold them all."""
    refs = users.to_arrow_refs()
    return list(zip(refs, ray.get([_rows_in.remote(ref) for ref in refs]), strict=True))


def users_in(block: pa.Table, start: int, stop: int) -> list[UserData]:
    """The users of rows [start, stop) of one block of `Ingested.users`."""
    part = block.slice(start, stop - start)
    part = part.filter(pc.equal(part.column("kind"), USER))
    return [pickle.loads(payload) for payload in part.column("payload").to_pylist()]
