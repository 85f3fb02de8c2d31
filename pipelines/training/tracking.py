"""Each job is one MLflow run in the registry's tracking store: parameters, aggregate metrics, the
mean training-loss curve, the per-user table (`per_user.parquet`, every user; `per_user.json`, the
first ones, which the MLflow UI shows as a table) and a loss-curve plot. What a run stores names
users only by pseudonym (Registry.pseudonym), so a `forget` leaves nothing of them in job runs."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

from prefixfleet.pipelines.training.tally import Tally

log = logging.getLogger("prefixfleet")
EXPERIMENT = "prefixfleet-jobs"
PLOTTED_USERS = 20


def loss_plot(curves: Sequence[list[float]]) -> Figure | None:
    """Median and 10–90th percentile band of the users' training loss, plus a few users."""
    if not curves:
        return None
    length = max(len(c) for c in curves)
    full = np.array([c for c in curves if len(c) == length])
    steps = np.arange(1, length + 1)
    figure = Figure(figsize=(7, 4))
    ax = figure.subplots()
    for curve in full[:PLOTTED_USERS]:
        ax.plot(steps, curve, color="tab:gray", alpha=0.3, linewidth=0.8)
    ax.fill_between(steps, np.percentile(full, 10, axis=0), np.percentile(full, 90, axis=0),
                    alpha=0.3, color="tab:blue", label="10–90th percentile")
    ax.plot(steps, np.median(full, axis=0), color="tab:blue", label=f"median of {len(full)} users")
    ax.set(xlabel="step", ylabel="training loss", title="per-user training loss")
    ax.legend()
    return figure


class JobRun:
    """The MLflow run of one job. With a database tracking URI its artifacts go under HOME/mlruns;
    with an `mlflow server`, wherever the server keeps artifacts."""

    def __init__(self, tracking_uri: str, home: Path) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        remote = tracking_uri.startswith(("http://", "https://"))
        self.artifact_location = None if remote else (home / "mlruns").resolve().as_uri()
        self.run_id = ""

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(EXPERIMENT, artifact_location=self.artifact_location)
        except MlflowException:  # created concurrently by another job
            return self.client.get_experiment_by_name(EXPERIMENT).experiment_id

    def start(self, kind: str, params: dict[str, Any]) -> str:
        run = self.client.create_run(self._experiment_id(), run_name=f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}",
                                     tags={"prefixfleet.kind": kind})
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
        return self.run_id

    def finish(self, metrics: dict[str, float], tally: Tally, summary: dict[str, Any]) -> None:
        """Metrics, the per-user table (users by pseudonym only), the loss plot and `summary`."""
        now = int(time.time() * 1000)
        logged = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        logged += [Metric("train_loss_mean", float(v), now, step) for step, v in enumerate(tally.mean_curve, 1)]
        for start in range(0, len(logged), 1000):
            self.client.log_batch(self.run_id, metrics=logged[start:start + 1000])
        self.client.log_artifact(self.run_id, str(tally.table_path))
        rows = [o.to_record(tally.pseudonym(o.key)) for o in tally.kept]
        if rows:
            self.client.log_table(self.run_id, {k: [r[k] for r in rows] for k in rows[0]}, "per_user.json")
        if (figure := loss_plot(tally.curves)) is not None:
            self.client.log_figure(self.run_id, figure, "loss_curves.png")
        self.client.log_dict(self.run_id, summary, "summary.json")
        self._terminate(RunStatus.FINISHED)

    def fail(self, reason: str) -> None:
        """Mark the run failed, if MLflow answers: the job's own error is what the caller reports."""
        if not self.run_id:
            return
        try:
            self.client.set_tag(self.run_id, "prefixfleet.error", reason[:5000])
            self._terminate(RunStatus.FAILED)
        except Exception as exc:  # noqa: BLE001 - never hide the job's error behind this one
            log.warning("could not mark job run %s failed: %s", self.run_id, exc)

    def _terminate(self, status: int) -> None:
        with redirect_stdout(sys.stderr):  # an mlflow server's run link is a log line, not the result
            self.client.set_terminated(self.run_id, RunStatus.to_string(status))
