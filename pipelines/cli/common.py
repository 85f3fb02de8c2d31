"""What every command shares: --home/--namespace/--json options, one-line failures, JSON output."""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from prefixfleet.registry import Registry, UserKey
from prefixfleet.registry.errors import IntegrityError, RegistryError

HomeOption = Annotated[Path | None, typer.Option(
    "--home", envvar="PREFIXFLEET_HOME", help="Holds the embedded MLflow database and file store (default ~/.prefixfleet).")]
NamespaceOption = Annotated[str, typer.Option("--namespace", help="Tenant namespace.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """Exit non-zero with a one-line reason on stderr."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


def emit(payload: dict[str, Any], as_json: bool, text: str) -> None:
    """The result: one JSON object on stdout with --json, else a human line."""
    if as_json:
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
    else:
        typer.echo(text)


@contextmanager
def needs(extra: str) -> Iterator[None]:
    """Around a command's heavy imports: in an install without `prefixfleet[extra]` the command
    ends with the line that installs what is missing, not a traceback."""
    try:
        yield
    except ModuleNotFoundError as exc:
        fail(f"this command needs {exc.name!r}, which this install lacks: pip install 'prefixfleet[{extra}]'")


def user_key(namespace: str, user: str) -> UserKey:
    try:
        return UserKey(namespace, user)
    except ValueError as exc:
        fail(str(exc), code=2)


def open_registry(home: Path | None) -> Registry:
    try:
        return Registry.from_env(home)
    except RegistryError as exc:
        fail(str(exc))


@contextmanager
def registry_session(home: Path | None) -> Iterator[Registry]:
    """An open registry; registry errors end the command with a one-line reason
    (exit 1, or 3 when stored bytes fail verification)."""
    registry = open_registry(home)
    try:
        yield registry
    except IntegrityError as exc:
        fail(str(exc), code=3)
    except (RegistryError, ValueError) as exc:
        fail(str(exc))
    finally:
        registry.close()
