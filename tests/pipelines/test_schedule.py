"""`prefixfleet schedule`: cron fire times, no overlapping runs, the run log, the lock and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import typer.main
from click.testing import CliRunner

from prefixfleet.pipelines.cli import schedule_cmds
from prefixfleet.pipelines.cli.app import app
from prefixfleet.pipelines.scheduling.cron import (
    ScheduleError,
    Scheduler,
    job_lock,
    job_name,
    prefixfleet_argv,
    run_subprocess,
    validate_cron,
)

COMMAND = ["retrain", "data.jsonl", "--backbone", "tiny"]


class FakeClock:
    """Wall-clock time that moves only when slept on or advanced."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += timedelta(seconds=seconds)


class FakeRunner:
    """A command that takes `durations[i]` seconds of fake time and exits with `codes[i]`."""

    def __init__(self, clock: FakeClock, durations: Sequence[float], codes: Sequence[int] = ()) -> None:
        self.clock, self.durations, self.codes = clock, list(durations), list(codes)
        self.spans: list[tuple[datetime, datetime]] = []

    def __call__(self, command: Sequence[str]) -> int:
        assert list(command) == COMMAND
        index = len(self.spans)
        start = self.clock.now
        self.clock.now += timedelta(seconds=self.durations[index])
        self.spans.append((start, self.clock.now))
        return self.codes[index] if self.codes else 0


def _scheduler(tmp_path: Path, cron: str, clock: FakeClock, runner: FakeRunner, lines: list[str]) -> Scheduler:
    return Scheduler(
        cron=cron, command=COMMAND, home=tmp_path, clock=clock, sleep=clock.sleep, runner=runner, log=lines.append
    )


def _events(scheduler: Scheduler, event: str) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in scheduler.log_path.read_text().splitlines()]
    return [record for record in records if record["event"] == event]


def _local(*args: int) -> str:
    return datetime(*args).astimezone().isoformat(timespec="seconds")


@pytest.mark.parametrize(
    "expr", ["61 * * * *", "* * *", "0 2 * * * 5", "bogus", "", "*/0 * * * *", "0 2 * * 8", "0 0 30 2 *"]
)
def test_bad_cron_is_rejected_up_front(expr: str, tmp_path: Path) -> None:
    with pytest.raises(ScheduleError, match="bad cron expression"):
        validate_cron(expr)
    with pytest.raises(ScheduleError):
        Scheduler(cron=expr, command=COMMAND, home=tmp_path)
    assert not (tmp_path / "schedule").exists()


def test_macros_and_plain_expressions_are_accepted() -> None:
    assert validate_cron(" 0 2 * * * ") == "0 2 * * *"
    assert validate_cron("@daily") == "@daily"


def test_empty_command_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ScheduleError, match="no command"):
        Scheduler(cron="0 2 * * *", command=[], home=tmp_path)


@pytest.mark.parametrize(
    "cron,start,expected",
    [
        ("*/15 * * * *", datetime(2030, 1, 1, 0, 7), [datetime(2030, 1, 1, 0, m) for m in (15, 30, 45)]
         + [datetime(2030, 1, 1, 1, 0)]),
        ("0 2 * * *", datetime(2030, 1, 1, 3, 0), [datetime(2030, 1, d, 2, 0) for d in (2, 3, 4)]),
        ("30 9 * * 1-5", datetime(2030, 1, 4, 12, 0), [datetime(2030, 1, 7, 9, 30), datetime(2030, 1, 8, 9, 30)]),
    ],
)
def test_runs_start_at_the_fire_times(cron: str, start: datetime, expected: list[datetime], tmp_path: Path) -> None:
    clock = FakeClock(start)
    runner = FakeRunner(clock, [5.0] * len(expected))
    lines: list[str] = []
    summary = _scheduler(tmp_path, cron, clock, runner, lines).run(max_runs=len(expected))
    assert [span[0] for span in runner.spans] == expected
    assert summary.runs == len(expected) and summary.skipped == 0
    assert max(clock.sleeps) <= 60.0, "sleeps are chunked so clock jumps are noticed"
    assert any("next run at" in line for line in lines)


def test_now_runs_at_once_then_follows_the_schedule(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2030, 1, 1, 10, 20, 5))
    runner = FakeRunner(clock, [1.0, 1.0])
    _scheduler(tmp_path, "0 * * * *", clock, runner, []).run(max_runs=2, run_now=True)
    assert [span[0] for span in runner.spans] == [datetime(2030, 1, 1, 10, 20, 5), datetime(2030, 1, 1, 11, 0)]


def test_a_slow_run_is_never_overlapped_and_the_missed_fires_are_logged(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2030, 1, 1, 0, 0, 30))
    runner = FakeRunner(clock, [150.0, 10.0, 10.0])  # the first run spans the 00:02 and 00:03 fire times
    lines: list[str] = []
    scheduler = _scheduler(tmp_path, "* * * * *", clock, runner, lines)
    summary = scheduler.run(max_runs=3)

    starts = [span[0] for span in runner.spans]
    assert starts == [datetime(2030, 1, 1, 0, m) for m in (1, 4, 5)]
    for (_, previous_end), (next_start, _) in zip(runner.spans, runner.spans[1:], strict=False):
        assert next_start >= previous_end, "two runs overlapped"
    skips = _events(scheduler, "skip")
    assert [s["fire_time"] for s in skips] == [_local(2030, 1, 1, 0, 2), _local(2030, 1, 1, 0, 3)]
    assert all(s["reason"] == "previous run still going" for s in skips)
    assert (summary.runs, summary.skipped) == (3, 2)
    assert sum("skipped fire time" in line for line in lines) == 2


def test_the_run_log_records_start_end_exit_code_and_duration(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2030, 1, 1, 1, 59))
    runner = FakeRunner(clock, [12.5, 3.0, 7.0], codes=[0, 3, 0])
    lines: list[str] = []
    scheduler = _scheduler(tmp_path, "0 2 * * *", clock, runner, lines)
    summary = scheduler.run(max_runs=3)

    assert scheduler.log_path == tmp_path / "schedule" / f"{job_name(COMMAND)}.jsonl"
    starts, ends = _events(scheduler, "start"), _events(scheduler, "end")
    assert [e["exit_code"] for e in ends] == [0, 3, 0]
    assert [e["duration_s"] for e in ends] == [12.5, 3.0, 7.0]
    assert [s["command"] for s in starts] == [COMMAND] * 3
    assert [s["started_at"] for s in starts] == [e["started_at"] for e in ends]
    assert ends[0]["started_at"] == _local(2030, 1, 1, 2, 0) and ends[0]["ended_at"] == _local(2030, 1, 1, 2, 0, 12)
    assert all(e["job"] == scheduler.job and e["cron"] == "0 2 * * *" for e in starts + ends)
    assert (summary.runs, summary.failed, summary.last_exit_code) == (3, 1, 0)
    assert any("start: prefixfleet retrain data.jsonl" in line for line in lines)
    assert any("end: exit code 3 after 3.0s" in line for line in lines)


def test_job_names_are_stable_file_safe_and_distinct() -> None:
    assert job_name(COMMAND) == job_name(list(COMMAND))
    assert job_name(COMMAND) != job_name([*COMMAND, "--json"])
    assert job_name(["../x y", "a"]).startswith("x-y-")


def test_a_job_held_by_another_scheduler_process_is_skipped(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2030, 1, 1, 0, 0))
    runner = FakeRunner(clock, [1.0])
    scheduler = _scheduler(tmp_path, "* * * * *", clock, runner, [])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from prefixfleet.pipelines.scheduling.cron import job_lock\n"
         "with job_lock(Path(sys.argv[1])) as held:\n    assert held is None\n    print('held', flush=True)\n"
         "    time.sleep(60)\n", str(scheduler.lock_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        summary = scheduler.run(max_runs=1, run_now=True)
    finally:
        holder.kill()
        holder.wait()
    assert runner.spans == [] and (summary.runs, summary.skipped) == (0, 1)
    (skip,) = _events(scheduler, "skip")
    assert skip["reason"] == f"job is running in another scheduler (pid {holder.pid})"
    with job_lock(scheduler.lock_path) as held:  # released when its holder died
        assert held is None


def test_each_run_is_a_fresh_prefixfleet_process() -> None:
    assert prefixfleet_argv(COMMAND) == [sys.executable, "-m", "prefixfleet.pipelines.cli", *COMMAND]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", [0, 3])
def test_a_real_subprocess_run_finishes_and_is_logged(code: int, tmp_path: Path) -> None:
    def python_exits(command: Sequence[str]) -> int:
        return run_subprocess([sys.executable, "-c", f"import sys; print('ran'); sys.exit({code})"])

    lines: list[str] = []
    began = time.monotonic()
    scheduler = Scheduler(cron="0 2 * * *", command=COMMAND, home=tmp_path, runner=python_exits, log=lines.append)
    summary = scheduler.run(max_runs=1, run_now=True)  # real clock: --now is what makes this quick
    assert time.monotonic() - began < 30
    assert (summary.runs, summary.failed, summary.last_exit_code) == (1, int(code != 0), code)
    assert [e["exit_code"] for e in _events(scheduler, "end")] == [code]


def _cli(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(typer.main.get_group(app), ["schedule", *args], env=env)


@pytest.fixture
def fake_cli(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Let the CLI schedule `retrain` with a runner that records commands and fails `--fail` ones."""
    calls: list[list[str]] = []

    def runner(command: Sequence[str]) -> int:
        calls.append(list(command))
        return 1 if "--fail" in command else 0

    monkeypatch.setattr(schedule_cmds, "_registered_commands", lambda: {"retrain", "schedule"})
    monkeypatch.setattr(schedule_cmds, "Scheduler", partial(Scheduler, runner=runner))
    return calls


@pytest.mark.parametrize(
    "args,reason",
    [
        (["--cron", "61 * * * *", "--", "retrain", "d"], "bad cron expression"),
        (["--cron", "0 2 * * *"], "no command to schedule"),
        (["--", "retrain", "d"], "--cron is required"),
        (["--cron", "0 2 * * *", "--max-runs", "0", "--", "retrain", "d"], "--max-runs must be at least 1"),
        (["--cron", "0 2 * * *", "--", "no-such-command"], "not a prefixfleet command"),
        (["--cron", "0 2 * * *", "--", "schedule", "--cron", "x"], "not a prefixfleet command"),
    ],
)
def test_cli_refuses_bad_input_with_one_line(
    args: list[str], reason: str, fake_cli: list[list[str]], tmp_path: Path
) -> None:
    result = _cli(["--home", str(tmp_path), *args])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {reason}") and result.stderr.count("\n") == 1
    assert fake_cli == [] and not (tmp_path / "schedule").exists()


def test_cli_passes_the_command_through_and_prints_json(fake_cli: list[list[str]], tmp_path: Path) -> None:
    result = _cli(
        ["--cron", "0 2 * * *", "--now", "--max-runs", "1", "--json", "--", *COMMAND, "--json"],
        env={"PREFIXFLEET_HOME": str(tmp_path)},
    )
    assert result.exit_code == 0, result.output
    assert fake_cli == [[*COMMAND, "--json"]]
    summary = json.loads(result.stdout)
    assert summary["runs"] == 1 and summary["failed"] == 0 and summary["last_exit_code"] == 0
    assert summary["command"] == [*COMMAND, "--json"] and summary["cron"] == "0 2 * * *"
    assert Path(summary["log"]).parent == tmp_path / "schedule" and Path(summary["log"]).is_file()


def test_cli_exits_non_zero_when_a_run_failed(fake_cli: list[list[str]], tmp_path: Path) -> None:
    result = _cli(["--home", str(tmp_path), "--cron", "@daily", "--now", "--max-runs", "1", "--", "retrain", "--fail"])
    assert result.exit_code == 1
    assert result.stdout.startswith("1 run(s), 1 failed")
    assert result.stderr.splitlines()[-1].startswith("error: 1 of 1 run(s) failed")
