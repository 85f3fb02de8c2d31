"""Job progress on stderr: a live bar on a terminal, a log line every few seconds otherwise."""
from __future__ import annotations

import logging
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from prefixfleet.pipelines.training.tally import Tally

log = logging.getLogger("prefixfleet")
LOG_EVERY_S = 5.0


def _eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class JobProgress:
    """Users done (of `total`) / skipped / failed, users per second and ETA."""

    def __init__(self, total: int, *, live: bool | None = None) -> None:
        self.total = total
        console = Console(stderr=True)
        self.live = console.is_terminal if live is None else live
        self.started = self.last_log = time.monotonic()
        self.logged_done = -1
        self.bar = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("skipped {task.fields[skipped]} · failed {task.fields[failed]} · {task.fields[rate]} users/s"),
            TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not self.live,
        )
        self.task = self.bar.add_task("training", total=total, skipped=0, failed=0, rate="0.0")

    def __enter__(self) -> JobProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def __call__(self, tally: Tally, running_done: int) -> None:
        failed, skipped = tally.counts["failed"], tally.counts["skipped"]
        done = min(self.total, tally.total + running_done)
        elapsed = max(1e-9, time.monotonic() - self.started)
        rate = done / elapsed
        self.bar.update(self.task, completed=done, skipped=skipped, failed=failed, rate=f"{rate:.1f}")
        now = time.monotonic()
        finished = done == self.total and done != self.logged_done
        if not self.live and (now - self.last_log >= LOG_EVERY_S or finished):
            self.last_log, self.logged_done = now, done
            eta = _eta((self.total - done) / rate) if rate > 0 else "?"
            log.info("%d/%d users done · skipped %d · failed %d · %.2f users/s · ETA %s",
                     done, self.total, skipped, failed, rate, eta)
