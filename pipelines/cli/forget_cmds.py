"""`forget USER` and `forget --users-file FILE`: erase one user, or many with one receipt line each.

A users file is read twice, streaming: first every line is checked (a bad line is named by file
and line, and then nothing is erased), then the users are forgotten a few at a time. A plain file
holds one user id per line in `--namespace`; a `.jsonl` file holds JSON objects with `user_id`
and, optionally, `namespace` — a job's `--per-user-out` file is one.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from prefixfleet.pipelines.cli.app import app
from prefixfleet.pipelines.cli.common import HomeOption, JsonOption, NamespaceOption, emit, fail, registry_session, user_key
from prefixfleet.registry import UserKey
from prefixfleet.registry.forgetting import WORKERS, ForgetResult, forget_all

BAD_LINES_SHOWN = 20


class BadLine(ValueError):
    """A line of a users file that names no user."""


def _key_of(line: str, namespace: str, as_json: bool) -> UserKey:
    if not as_json:
        return UserKey(namespace, line)
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadLine(f"not JSON ({exc.msg})") from None
    if not isinstance(row, dict) or "user_id" not in row:
        raise BadLine("expected a JSON object with a user_id")
    return UserKey(row.get("namespace", namespace), row["user_id"])


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) for every line that is not blank; ids keep their inner spaces."""
    with path.open(encoding="utf-8", newline="") as lines:
        for number, line in enumerate(lines, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def read_users(path: Path, namespace: str) -> Iterator[UserKey]:
    """The users of a users file (see the module docstring); raises BadLine for the first bad one."""
    as_json = path.suffix == ".jsonl"
    for number, line in _lines(path):
        try:
            yield _key_of(line, namespace, as_json)
        except ValueError as exc:
            raise BadLine(f"{path}:{number}: {exc}") from None


def _check(path: Path, namespace: str) -> int:
    """The number of users in the file; ends the command (exit 2) naming its bad lines."""
    bad: list[str] = []
    count = bad_count = 0
    as_json = path.suffix == ".jsonl"
    try:
        for number, line in _lines(path):
            try:
                _key_of(line, namespace, as_json)
                count += 1
            except ValueError as exc:
                bad_count += 1
                if len(bad) < BAD_LINES_SHOWN:
                    bad.append(f"{path}:{number}: {exc}")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read the users file {path}: {exc}", code=2)
    if bad_count:
        for line in bad:
            typer.echo(f"bad line {line}", err=True)
        more = f" (the first {len(bad)} above)" if bad_count > len(bad) else ""
        fail(f"{bad_count} bad line(s) in {path}{more}; nothing was forgotten", code=2)
    return count


def _receipt_line(done: ForgetResult) -> str:
    name = f"{done.key.namespace}/{done.key.user_id}"
    if done.receipt is None:
        return f"failed {name}: {done.error}"
    r = done.receipt
    return f"forgot {name}: {len(r.versions)} versions, {len(r.aliases)} aliases, {len(r.objects)} artifacts"


def _forget_file(path: Path, namespace: str, workers: int, home: Path | None, as_json: bool) -> None:
    if workers < 1:
        fail(f"--workers must be at least 1, got {workers}", code=2)
    users = _check(path, namespace)
    totals = {"users": users, "forgotten": 0, "failed": 0, "versions": 0, "artifacts": 0}
    with registry_session(home) as registry:
        for done in forget_all(registry, read_users(path, namespace), workers=workers):
            if done.receipt is None:
                totals["failed"] += 1
                payload = {"namespace": done.key.namespace, "user_id": done.key.user_id, "error": done.error}
            else:
                totals["forgotten"] += 1
                totals["versions"] += len(done.receipt.versions)
                totals["artifacts"] += len(done.receipt.objects)
                payload = done.receipt.to_json()
            emit(payload, as_json, _receipt_line(done))
    emit(totals, as_json, f"forgot {totals['forgotten']} of {users} users: {totals['versions']} versions, "
                          f"{totals['artifacts']} artifacts; {totals['failed']} failed")
    if totals["failed"]:
        fail(f"{totals['failed']} of {users} forgets failed; run the same command again to finish (forget is "
             "idempotent)")


@app.command()
def forget(
    user: Annotated[str | None, typer.Argument(help="The user (or task) id.")] = None,
    namespace: NamespaceOption = "default",
    users_file: Annotated[Path | None, typer.Option(
        "--users-file", help="Forget every user of this file: one id per line, or JSON lines with user_id "
                             "(and namespace) in a .jsonl file.")] = None,
    workers: Annotated[int, typer.Option(help="Forgets in flight at once (--users-file).")] = WORKERS,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Erase every version, alias and artifact of a user (or of every user of --users-file);
    print a receipt per user."""
    if (user is None) == (users_file is None):
        fail("give one USER or --users-file FILE", code=2)
    if users_file is not None:
        return _forget_file(users_file, namespace, workers, home, as_json)
    key = user_key(namespace, user)
    with registry_session(home) as registry:
        receipt = registry.forget(key)
    emit(receipt.to_json(), as_json, _receipt_line(ForgetResult(key, receipt)))
    return None
