"""Hostile rows: the data reader beside the Hugging Face `datasets` JSON loader, on the same files.

Hypothesis draws files of hostile rows (tests/fixtures/hostile_rows.py: good rows; rows with one
defect — missing or mistyped fields, unsafe user ids, bad namespaces, blank texts, unpaired
surrogates; raw lines — broken or deeply nested JSON, non-objects, bytes that are not UTF-8, random
garbage). For each JSONL file:

  ours      pipelines.training.data.read_shard (what the Ray Data read tasks run), checked as the tests check it: no crash, every
            non-blank row counted once, each good row with its user, each bad row named by file and
            line with a reason naming its problem.
  datasets  datasets.load_dataset("json", data_files=FILE), in a worker process of its own: the
            whole file loads, fails, or kills the process (pyarrow's JSON parser segfaults on
            deeply nested input; the worker is then restarted); rows are not validated, so a
            hostile row that loads is data.

Parquet files (string columns) go through ours only. Prints rows tried, named, accepted, files
refused whole, and hostile rows that came through as data.

    python benchmarks/bench_hostile_rows.py [--files 200] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures: the hostile rows

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import datasets  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.fixtures.hostile_rows import (  # noqa: E402
    ANY,
    Row,
    check_accounting,
    jsonl_rows,
    parquet_rows,
    read_jsonl,
    read_parquet,
)


class AnchorWorker:
    """`datasets.load_dataset("json")` in a child process, restarted whenever a file kills it."""

    def __init__(self, cache: str) -> None:
        self.cache, self.process = cache, None

    def load(self, path: Path) -> dict:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([sys.executable, __file__, "--anchor-worker", self.cache],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.process.stdin.write(f"{path}\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            self.process.wait()
            return {"crashed": f"signal {-self.process.returncode}" if self.process.returncode < 0 else "exit"}
        return json.loads(answer)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait()


def anchor_worker(cache: str) -> None:
    logging.disable(logging.CRITICAL)
    datasets.disable_progress_bars()
    for line in sys.stdin:
        try:
            loaded = datasets.load_dataset("json", data_files=line.strip(), cache_dir=cache, split="train")
            answer = {"rows": len(loaded)}
        except Exception as exc:  # noqa: BLE001 - what the anchor does with the file is the measurement
            answer = {"error": type(exc).__name__}
        print(json.dumps(answer), flush=True)


def run_jsonl(files: int, at_seed: int, folder: str) -> tuple[Counter, Counter, float, float]:
    ours, anchor = Counter(), Counter()
    times = {"ours": 0.0, "datasets": 0.0}
    worker = AnchorWorker(os.path.join(folder, "cache"))

    @seed(at_seed)
    @settings(max_examples=files, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(jsonl_rows, min_size=1, max_size=25))
    def one_file(rows: list[Row]) -> None:
        started = time.perf_counter()
        data, counted, wheres = read_jsonl(rows, blanks=[])
        check_accounting(data, counted, wheres)
        times["ours"] += time.perf_counter() - started
        ours.update(files=1, rows=len(counted), named=len(data.bad_rows), accepted=data.rows_used,
                    hostile=sum(r.expect not in (None, ANY) for r in counted))
        path = Path(folder) / f"hostile-{ours['files']}.jsonl"
        path.write_bytes(b"\n".join(r.data for r in rows) + b"\n")
        started = time.perf_counter()
        answer = worker.load(path)
        times["datasets"] += time.perf_counter() - started
        path.unlink()
        if "rows" in answer:
            anchor.update(files=1, loaded=1, rows=answer["rows"], hostile_as_data=max(0, answer["rows"] - data.rows_used))
        elif "crashed" in answer:
            anchor.update(files=1, crashed=1, **{f"crash {answer['crashed']}": 1})
        else:
            anchor.update(files=1, refused_whole=1, **{f"error {answer['error']}": 1})

    try:
        one_file()
    finally:
        worker.close()
    return ours, anchor, times["ours"], times["datasets"]


def run_parquet(files: int, at_seed: int) -> tuple[Counter, float]:
    ours = Counter()
    started = time.perf_counter()

    @seed(at_seed)
    @settings(max_examples=files, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(parquet_rows, min_size=1, max_size=25))
    def one_file(rows: list[Row]) -> None:
        data, counted, wheres = read_parquet(rows)
        check_accounting(data, counted, wheres)
        ours.update(files=1, rows=len(counted), named=len(data.bad_rows), accepted=data.rows_used,
                    hostile=sum(r.expect is not None for r in counted))

    one_file()
    return ours, time.perf_counter() - started


def main() -> None:
    if sys.argv[1:2] == ["--anchor-worker"]:
        return anchor_worker(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        ours, anchor, ours_s, anchor_s = run_jsonl(args.files, args.seed, folder)
    parquet, parquet_s = run_parquet(args.files, args.seed)
    print(f"JSONL, {ours['files']} files, {ours['rows']} rows ({ours['hostile']} hostile by construction, "
          "plus random garbage lines):")
    print(f"  ours      named {ours['named']} bad rows by file and line, accepted {ours['accepted']}; "
          f"crashes 0; {ours_s:.1f} s")
    errors = {k.removeprefix("error "): v for k, v in anchor.items() if k.startswith("error ")}
    crashes = {k.removeprefix("crash "): v for k, v in anchor.items() if k.startswith("crash ")}
    print(f"  datasets  loaded {anchor['loaded']} files ({anchor['rows']} rows, {anchor['hostile_as_data']} of them "
          f"rows ours refused), refused {anchor['refused_whole']} files whole {errors}, "
          f"crashed on {anchor['crashed']} {crashes}; {anchor_s:.1f} s")
    print(f"Parquet, {parquet['files']} files, {parquet['rows']} rows ({parquet['hostile']} hostile):")
    print(f"  ours      named {parquet['named']} bad rows by file and row, accepted {parquet['accepted']}; "
          f"crashes 0; {parquet_s:.1f} s")


if __name__ == "__main__":
    main()
