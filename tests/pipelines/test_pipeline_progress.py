"""Job progress off a terminal: log lines with users done / skipped / failed, rate and ETA."""
from __future__ import annotations

import logging

import pytest

from prefixfleet.pipelines.training.outcome import Outcome
from prefixfleet.pipelines.training.progress import JobProgress
from prefixfleet.registry import UserKey


def test_plain_progress_logs_counts_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    done = [Outcome(key=UserKey("ns", "a"), status="trained"), Outcome.failed(UserKey("ns", "b"), "x")]
    with caplog.at_level(logging.INFO, logger="prefixfleet"), JobProgress(3, 4, live=False) as progress:
        progress(done[:1], 0)
        progress(done, 1)
    line = caplog.messages[-1]
    assert line.startswith("3/3 users done · skipped 4 · failed 1 ·") and "users/s · ETA 0s" in line
