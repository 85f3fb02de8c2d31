"""Helpers shared by the pipeline tests here and in tests/integration."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import typer.main
from click.testing import CliRunner, Result

from prefixfleet.pipelines.cli import app
from prefixfleet.workers.synthetic import dataset, user_rows

STEPS = 12
EXAMPLES = 12
BACKBONE = {"seed": 3, "hidden": 32}  # the pipeline tests' backbone: `tiny_backbones.path(**BACKBONE)`


def cli(*args: str) -> Result:
    """`prefixfleet ARGS…` in this process; stdout and stderr kept apart."""
    return CliRunner().invoke(typer.main.get_command(app), list(args))


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def synthetic(users: int, examples: int = EXAMPLES) -> list[dict]:
    return dataset(users, examples)


def restyled(rows: list[dict], user_id: str, style_index: int) -> list[dict]:
    """`rows` with `user_id`'s examples replaced by examples in another user's style."""
    kept = [r for r in rows if r["user_id"] != user_id]
    count = len(rows) - len(kept)
    return kept + [dict(r, user_id=user_id) for r in user_rows(style_index, count, seed=7)]
