"""The data reader under hostile input (Hypothesis): whatever the rows, JSONL or Parquet, reading
never crashes, every non-blank row is counted once, every good row reaches its user, and every bad
row is named by file and line (or Parquet row) with a reason naming its problem."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from tests.fixtures.hostile_rows import (
    DEFECTS,
    RAW_LINES,
    Row,
    check_accounting,
    defective_records,
    jsonl_line,
    jsonl_rows,
    parquet_rows,
    read_jsonl,
    read_parquet,
)

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
