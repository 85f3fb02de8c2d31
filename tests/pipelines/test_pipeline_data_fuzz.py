"""The data reader under hostile input (Hypothesis): whatever the rows, JSONL or Parquet, reading
never crashes, every non-blank row is counted once, every good row reaches its user, and every bad
row is named by file and line (or Parquet row) with a reason naming its problem."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from prefixfleet.pipelines.training.data import BadRow
from tests.fixtures.hostile_rows import (
    DEFECTS,
    RAW_LINES,
    UNICODE_IDS,
    Row,
    check_accounting,
    defective_records,
    jsonl_line,
    jsonl_rows,
    parquet_rows,
    read_jsonl,
    read_parquet,
)
from tests.fixtures.reading import ingest_all

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_kind_of_defect_is_named(defect: str) -> None:
    """Every defect at least once, whatever the fuzzing below happens to draw."""
    record, expect = find(defective_records((defect,)), lambda _: True, settings=settings(database=None))
    rows = [Row(jsonl_line({"user_id": "ok", "text": "fine"}), None), Row(jsonl_line(record), expect)]
    check_accounting(*read_jsonl(rows, blanks=[]))


@pytest.mark.parametrize(("line", "expect"), RAW_LINES, ids=[str(i) for i in range(len(RAW_LINES))])
def test_each_hostile_line_is_named(line: bytes, expect: str) -> None:
    check_accounting(*read_jsonl([Row(jsonl_line({"user_id": "ok", "text": "fine"}), None), Row(line, expect)], []))


def test_a_byte_order_mark_opening_the_file_is_skipped_and_one_inside_it_is_named() -> None:
    bom = b"\xef\xbb\xbf" + jsonl_line({"user_id": "ok", "text": "fine"})
    check_accounting(*read_jsonl([Row(bom, None), Row(bom, "not valid JSON")], []))


@FUZZ
@given(st.lists(jsonl_rows, min_size=1, max_size=25), st.lists(st.integers(0, 25), max_size=3))
def test_jsonl_never_crashes_and_names_every_bad_line(rows: list[Row], blanks: list[int]) -> None:
    check_accounting(*read_jsonl(rows, blanks))


@FUZZ
@given(st.lists(parquet_rows, min_size=1, max_size=25))
def test_parquet_never_crashes_and_names_every_bad_row(rows: list[Row]) -> None:
    check_accounting(*read_parquet(rows))


@pytest.mark.ray
def test_the_ray_data_ingest_accounts_for_every_hostile_row_as_the_parser_does(local_ray: None) -> None:
    """Every raw hostile line, each kind of defect and every Unicode id in one file, read by the
    job's ingest: read tasks, buckets and grouping keep the parser's accounting."""
    defects = [find(defective_records((d,)), lambda _: True, settings=settings(database=None)) for d in DEFECTS]
    rows = [Row(line, expect) for line, expect in RAW_LINES]
    rows += [Row(jsonl_line(record), expect) for record, expect in defects]
    rows += [Row(jsonl_line({"user_id": user, "text": f"text of {user}"}), None) for user in UNICODE_IDS]
    parsed, counted, wheres = read_jsonl(rows, blanks=[3])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "hostile.jsonl"
        lines = [row.data for row in rows]
        path.write_bytes(b"\n".join(lines[:3] + [b"   "] + lines[3:]) + b"\n")
        data, ingested = ingest_all(str(path))
    wheres = [w.rsplit(":", 1)[1] for w in wheres]
    ingested.bad_rows = [BadRow(f"LINE:{b.where.rsplit(':', 1)[1]}", b.reason) for b in ingested.bad_rows]
    check_accounting(ingested, counted, [f"LINE:{w}" for w in wheres])
    assert data.bad_count == len(parsed.bad_rows) and set(ingested.users) == set(parsed.users)
    for key, user in parsed.users.items():
        assert ingested.users[key].fingerprint == user.fingerprint
