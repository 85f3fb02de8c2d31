"""Run a prefixfleet command on a cron schedule on this machine: one run at a time, every run logged.

A fire time that passes while a run is still going is skipped and logged, never overlapped. An
exclusive file lock per job under `$PREFIXFLEET_HOME/schedule/` keeps two scheduler processes from
running the same job at once. Each run's start and end (exit code, duration) and each skipped fire
time go to stderr and, as JSON lines, to `$PREFIXFLEET_HOME/schedule/<job>.jsonl`.

Schedules use the machine's local wall-clock time, as cron does. Clock, sleep and runner are
injectable so the loop can be driven without waiting for real time.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from croniter import CroniterError, croniter

Clock = Callable[[], datetime]
Runner = Callable[[Sequence[str]], int]

MAX_SLEEP_S = 60.0  # re-read the clock at least this often, so clock jumps and DST shifts are noticed


class ScheduleError(ValueError):
    """A schedule that cannot run: a bad cron expression or an empty command."""


def validate_cron(expr: str) -> str:
    """Return `expr` stripped if it is a 5-field cron expression (or a macro such as @daily) that fires."""
    text = expr.strip()
    if not text.startswith("@") and len(text.split()) != 5:
        raise ScheduleError(
            f"bad cron expression {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week)"
        )
    try:
        croniter(text, datetime(2000, 1, 1)).get_next(datetime)
    except (CroniterError, ValueError, KeyError) as exc:
        raise ScheduleError(f"bad cron expression {expr!r}: {exc}") from None
    return text


def job_name(command: Sequence[str]) -> str:
    """A stable, file-safe name for a command: its first word plus a hash of all its words."""
    digest = hashlib.sha256(json.dumps(list(command)).encode()).hexdigest()[:12]
    head = re.sub(r"[^A-Za-z0-9_.-]+", "-", command[0]).strip("-.")[:40] if command else ""
    return f"{head or 'job'}-{digest}"


def prefixfleet_argv(command: Sequence[str]) -> list[str]:
    """The argv that runs a prefixfleet subcommand in a fresh Python process."""
    return [sys.executable, "-m", "prefixfleet.pipelines.cli", *command]


def run_subprocess(argv: Sequence[str]) -> int:
    """Run `argv` to completion and return its exit code.

    Its stdout goes to our file descriptor 2, so a `--json` result on our stdout stays one object.
    """
    return subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=2, check=False).returncode


def run_prefixfleet(command: Sequence[str]) -> int:
    """The default runner: `prefixfleet COMMAND...` as a fresh process."""
    return run_subprocess(prefixfleet_argv(command))


@contextmanager
def job_lock(path: Path) -> Iterator[str | None]:
    """Try to hold an exclusive lock on `path`: yields None while held, else the holder's pid (not waiting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            yield handle.read().strip() or "unknown"
            return
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield None


def _stamp(moment: datetime) -> str:
    return moment.astimezone().isoformat(timespec="seconds")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Summary:
    """What one scheduler session did."""

    runs: int = 0
    failed: int = 0
    skipped: int = 0
    last_exit_code: int | None = None


@dataclass
class Scheduler:
    """Fires `command` at the times of `cron`, one run at a time, logging under `home/schedule/`."""

    cron: str
    command: list[str]
    home: Path
    job: str = ""
    clock: Clock = datetime.now
    sleep: Callable[[float], None] = time.sleep
    runner: Runner = run_prefixfleet
    log: Callable[[str], None] = _to_stderr

    def __post_init__(self) -> None:
        self.cron = validate_cron(self.cron)
        if not self.command:
            raise ScheduleError("no command to schedule: put it after `--`")
        self.job = self.job or job_name(self.command)

    @property
    def log_path(self) -> Path:
        return self.home / "schedule" / f"{self.job}.jsonl"

    @property
    def lock_path(self) -> Path:
        return self.home / "schedule" / f"{self.job}.lock"

    def run(self, *, max_runs: int | None = None, run_now: bool = False) -> Summary:
        """Fire until `max_runs` fire times were handled (forever when None); `run_now` adds one at once.

        A fire time counts as handled when it ran or found the job locked by another scheduler;
        fire times that pass during a run are skipped and do not count.
        """
        summary = Summary()
        start = self.clock()
        fires = croniter(self.cron, start)
        fire = start if run_now else fires.get_next(datetime)
        handled = 0
        while True:
            self._wait_until(fire)
            self._fire(fire, summary)
            handled += 1
            if max_runs is not None and handled >= max_runs:
                return summary
            ended = self.clock()
            fire = fires.get_next(datetime)
            while fire < ended:
                self._skip(fire, "previous run still going", summary)
                fire = fires.get_next(datetime)

    def _wait_until(self, fire: datetime) -> None:
        remaining = (fire - self.clock()).total_seconds()
        if remaining > 0:
            self.log(f"{_stamp(self.clock())} {self.job}: next run at {_stamp(fire)}")
        while remaining > 0:
            self.sleep(min(remaining, MAX_SLEEP_S))
            remaining = (fire - self.clock()).total_seconds()

    def _fire(self, fire: datetime, summary: Summary) -> None:
        with job_lock(self.lock_path) as holder:
            if holder is not None:
                self._skip(fire, f"job is running in another scheduler (pid {holder})", summary)
                return
            started = self.clock()
            self._event("start", fire, started_at=_stamp(started), command=self.command)
            self.log(f"{_stamp(started)} {self.job}: start: prefixfleet {shlex.join(self.command)}")
            exit_code = self.runner(self.command)
            ended = self.clock()
            duration = round((ended - started).total_seconds(), 3)
            self._event(
                "end", fire, started_at=_stamp(started), ended_at=_stamp(ended), duration_s=duration,
                exit_code=exit_code,
            )
        self.log(f"{_stamp(ended)} {self.job}: end: exit code {exit_code} after {duration:.1f}s")
        summary.runs += 1
        summary.failed += int(exit_code != 0)
        summary.last_exit_code = exit_code

    def _skip(self, fire: datetime, reason: str, summary: Summary) -> None:
        self._event("skip", fire, reason=reason)
        self.log(f"{_stamp(self.clock())} {self.job}: skipped fire time {_stamp(fire)}: {reason}")
        summary.skipped += 1

    def _event(self, event: str, fire: datetime, **fields: Any) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        record = {"event": event, "job": self.job, "cron": self.cron, "fire_time": _stamp(fire), **fields}
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
