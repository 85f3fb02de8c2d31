"""Every outcome of a job, in memory that does not grow with the number of users: counts, the
first KEPT outcomes, running sums for the mean losses and curve, a bounded sample of loss curves
for the plot, and each user's row streamed to a Parquet file (users by pseudonym: the job run's
table) and, when asked, to a JSONL file (users by id: the caller's own `--per-user-out`)."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefixfleet.pipelines.training.outcome import STATUSES, Outcome
from prefixfleet.registry import UserKey

KEPT = 1000  # outcomes kept whole (the --json `per_user`, the run's table preview)
CURVES_KEPT = 200  # loss curves kept for the plot
WRITE_EVERY = 1000

RECORD_SCHEMA = pa.schema([
    ("namespace", pa.string()), ("user", pa.string()), ("status", pa.string()), ("version", pa.int64()),
    ("sha256", pa.string()), ("eval_loss", pa.float64()), ("baseline_eval_loss", pa.float64()),
    ("production_eval_loss", pa.float64()), ("promoted", pa.bool_()), ("reason", pa.string()),
    ("unavailable", pa.bool_()),
])


def listed(outcome: Outcome) -> bool:
    """Whether a user is one of `per_user`: trained, failed or promoted (other skips are counted)."""
    return outcome.status != "skipped" or outcome.promoted


class Tally:
    """Use as a context manager: the files are closed on exit."""

    def __init__(self, pseudonym: Callable[[UserKey], str], table: Path, per_user_out: Path | None = None,
                 on_outcome: Callable[[Outcome], None] | None = None) -> None:
        self.pseudonym, self.on_outcome = pseudonym, on_outcome
        self.counts: Counter[str] = Counter()
        self.kept: list[Outcome] = []
        self.listed = 0  # users of `per_user`, kept or not
        self.curves: list[list[float]] = []
        self.loss_sums = {"eval_loss": 0.0, "baseline_eval_loss": 0.0}
        self.with_loss = 0
        self.curve_sum: np.ndarray | None = None
        self.curve_count = 0
        self.down: Outcome | None = None  # the first user failed by a server past the outage deadline
        self._records: list[dict[str, Any]] = []
        self.table_path = table
        self._table = pq.ParquetWriter(table, RECORD_SCHEMA)
        self._jsonl: IO[str] | None = per_user_out.open("w") if per_user_out else None

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def total(self) -> int:
        return sum(self.counts[s] for s in STATUSES)

    def add(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            self.counts[outcome.status] += 1
            self.counts["promoted"] += outcome.promoted
            self.counts["unavailable"] += outcome.unavailable
            if len(self.kept) < KEPT:
                self.kept.append(outcome)
            if outcome.unavailable and self.down is None:
                self.down = outcome
            if listed(outcome):
                self.listed += 1
                if self._jsonl is not None:
                    self._jsonl.write(json.dumps(outcome.to_json(), default=str) + "\n")
            if outcome.status == "trained" and outcome.eval_loss is not None:
                self.with_loss += 1
                for name in self.loss_sums:
                    self.loss_sums[name] += getattr(outcome, name) or 0.0
            self._curve(outcome.loss_curve)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
            self._records.append(outcome.to_record(self.pseudonym(outcome.key)))
        if len(self._records) >= WRITE_EVERY:
            self._flush()

    def _curve(self, curve: list[float]) -> None:
        if not curve:
            return
        if len(self.curves) < CURVES_KEPT:
            self.curves.append(curve)
        values = np.asarray(curve, dtype=np.float64)
        if self.curve_sum is None:
            self.curve_sum = values
        else:  # the mean over the steps every curve has
            length = min(len(self.curve_sum), len(values))
            self.curve_sum = self.curve_sum[:length] + values[:length]
        self.curve_count += 1

    @property
    def mean_curve(self) -> list[float]:
        return [] if self.curve_sum is None else list(self.curve_sum / self.curve_count)

    def mean_losses(self) -> dict[str, float]:
        if not self.with_loss:
            return {}
        return {f"mean_{name}": total / self.with_loss for name, total in self.loss_sums.items()}

    def _flush(self) -> None:
        if self._records:
            self._table.write_table(pa.Table.from_pylist(self._records, schema=RECORD_SCHEMA))
            self._records = []

    def close(self) -> None:
        self._flush()
        self._table.close()
        if self._jsonl is not None:
            self._jsonl.close()
