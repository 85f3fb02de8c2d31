"""Hostile rows: the data reader beside the Hugging Face `datasets` JSON loader, on the same files.

Hypothesis draws files of hostile rows (tests/fixtures/hostile_rows.py: good rows; rows with one
defect — missing or mistyped fields, unsafe user ids, bad namespaces, blank texts, unpaired
surrogates; raw lines — broken or deeply nested JSON, non-objects, bytes that are not UTF-8, random
garbage). For each JSONL file:

  ours      pipelines.training.data.read_data, checked as the tests check it: no crash, every
            non-blank row counted once, each good row with its user, each bad row named by file and
            line with a reason naming its problem.
  datasets  datasets.load_dataset("json", data_files=FILE): the whole file loads or fails; rows
            are not validated, so a hostile row that loads is data.

Parquet files (string columns) go through ours only. Prints rows tried, named, accepted, files
refused whole, and hostile rows that came through as data.

    python benchmarks/bench_hostile_rows.py [--files 200] [--seed 0]
"""
from __future__ import annotations

import argparse
import logging
import os
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


def run_jsonl(files: int, at_seed: int, cache: str) -> tuple[Counter, Counter, float, float]:
    ours, anchor = Counter(), Counter()
    times = {"ours": 0.0, "datasets": 0.0}

    @seed(at_seed)
    @settings(max_examples=files, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(jsonl_rows, min_size=1, max_size=25))
    def one_file(rows: list[Row]) -> None:
        started = time.perf_counter()
        data, counted, wheres = read_jsonl(rows, blanks=[])
        check_accounting(data, counted, wheres)
        times["ours"] += time.perf_counter() - started
        ours.update(files=1, rows=len(counted), named=len(data.bad_rows), accepted=data.rows_used,
                    hostile=sum(r.expect not in (None, ANY) for r in counted))
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "hostile.jsonl"
            path.write_bytes(b"\n".join(r.data for r in rows) + b"\n")
            started = time.perf_counter()
            try:
                loaded = datasets.load_dataset("json", data_files=str(path), cache_dir=cache, split="train")
                anchor.update(files=1, loaded=1, rows=len(loaded),
                              hostile_as_data=max(0, len(loaded) - data.rows_used))
            except Exception as exc:  # noqa: BLE001 - what the anchor does with the file is the measurement
                anchor.update(files=1, refused_whole=1, **{f"error {type(exc).__name__}": 1})
            times["datasets"] += time.perf_counter() - started

    one_file()
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as cache:
        ours, anchor, ours_s, anchor_s = run_jsonl(args.files, args.seed, cache)
    parquet, parquet_s = run_parquet(args.files, args.seed)
    print(f"JSONL, {ours['files']} files, {ours['rows']} rows ({ours['hostile']} hostile by construction, "
          "plus random garbage lines):")
    print(f"  ours      named {ours['named']} bad rows by file and line, accepted {ours['accepted']}; "
          f"crashes 0; {ours_s:.1f} s")
    errors = {k.removeprefix("error "): v for k, v in anchor.items() if k.startswith("error ")}
    print(f"  datasets  loaded {anchor['loaded']} files ({anchor['rows']} rows, {anchor['hostile_as_data']} of them "
          f"rows ours refused), refused {anchor['refused_whole']} files whole {errors}; {anchor_s:.1f} s")
    print(f"Parquet, {parquet['files']} files, {parquet['rows']} rows ({parquet['hostile']} hostile):")
    print(f"  ours      named {parquet['named']} bad rows by file and row, accepted {parquet['accepted']}; "
          f"crashes 0; {parquet_s:.1f} s")


if __name__ == "__main__":
    main()
