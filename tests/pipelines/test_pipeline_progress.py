"""Job progress off a terminal: log lines with users done / skipped / failed, rate and ETA."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from prefixfleet.pipelines.training.outcome import Outcome
from prefixfleet.pipelines.training.progress import JobProgress
from prefixfleet.pipelines.training.tally import Tally
from prefixfleet.registry import UserKey


def test_plain_progress_logs_counts_rate_and_eta(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    done = [Outcome(key=UserKey("ns", "a"), status="trained"), Outcome.failed(UserKey("ns", "b"), "x"),
            Outcome(key=UserKey("ns", "c"), status="skipped")]
    with caplog.at_level(logging.INFO, logger="prefixfleet"), JobProgress(4, live=False) as progress, \
            Tally(str, tmp_path / "table.parquet") as tally:
        tally.add(done[:1])
        progress(tally, 0)
        tally.add(done[1:])
        progress(tally, 1)
    line = caplog.messages[-1]
    assert line.startswith("4/4 users done · skipped 1 · failed 1 ·") and "users/s · ETA 0s" in line
