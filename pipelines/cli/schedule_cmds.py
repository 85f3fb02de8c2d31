"""`prefixfleet schedule --cron EXPR -- COMMAND ...`: run a prefixfleet command on a cron schedule here."""
from __future__ import annotations

import signal
import sys
from dataclasses import asdict
from typing import Annotated

import typer
import typer.main

from prefixfleet.pipelines.cli.app import app
from prefixfleet.pipelines.cli.common import HomeOption, JsonOption, emit, fail
from prefixfleet.pipelines.scheduling.cron import ScheduleError, Scheduler
from prefixfleet.registry import home_dir


def _registered_commands() -> set[str]:
    return {info.name or typer.main.get_command_name(info.callback.__name__) for info in app.registered_commands}


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM into SystemExit so a running child is killed and the job lock released."""
    sys.exit(128 + signum)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def schedule(
    ctx: typer.Context,
    cron: Annotated[
        str | None, typer.Option("--cron", help="5-field cron expression in local time, e.g. '0 2 * * *'.")
    ] = None,
    max_runs: Annotated[
        int | None, typer.Option("--max-runs", help="Stop after N fire times (default: run until stopped).")
    ] = None,
    now: Annotated[bool, typer.Option("--now", help="Also run once right away, then follow the schedule.")] = False,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Run a prefixfleet command on a cron schedule on this machine, never two runs at once.

    Put the command after `--`: `prefixfleet schedule --cron "0 2 * * *" -- retrain DATA --backbone X`.
    Each run is a fresh process; runs are logged to stderr and HOME/schedule/<job>.jsonl, next to
    the lock that keeps two schedulers from running the same job at once.
    """
    command = list(ctx.args)
    if cron is None:
        fail("--cron is required, e.g. --cron '0 2 * * *'", 2)
    if max_runs is not None and max_runs < 1:
        fail(f"--max-runs must be at least 1, got {max_runs}", 2)
    if not command:
        fail("no command to schedule: put a prefixfleet command after `--`, e.g. -- retrain DATA --backbone X", 2)
    if command[0] == "schedule" or command[0] not in _registered_commands():
        fail(f"not a prefixfleet command to schedule: {command[0]!r}", 2)
    try:
        scheduler = Scheduler(cron=cron, command=command, home=home_dir(home))
    except ScheduleError as exc:
        fail(str(exc), 2)

    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        summary = scheduler.run(max_runs=max_runs, run_now=now)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = {"job": scheduler.job, "cron": scheduler.cron, "command": command, "log": str(scheduler.log_path)}
    emit(
        {**result, **asdict(summary)},
        json_output,
        f"{summary.runs} run(s), {summary.failed} failed, {summary.skipped} skipped; log: {scheduler.log_path}",
    )
    if summary.failed:
        fail(f"{summary.failed} of {summary.runs} run(s) failed; see {scheduler.log_path}")
