"""Helpers shared by the pipeline tests here and in tests/integration."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import ray
import typer.main
from click.testing import CliRunner, Result

from prefixfleet.pipelines.cli import app
from prefixfleet.pipelines.cluster import LOCAL_OBJECT_STORE_BYTES
from prefixfleet.workers.synthetic import dataset, user_rows
from prefixfleet.workers.tiny import build_backbone

STEPS = 12
EXAMPLES = 12


def ensure_ray() -> None:
    """Local Ray with 2 CPUs, once per test process (whichever test module asks first)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 logging_level=logging.WARNING)


def cli(*args: str) -> Result:
    """`prefixfleet ARGS…` in this process; stdout and stderr kept apart."""
    return CliRunner().invoke(typer.main.get_command(app), list(args))


def tiny_backbone(folder: Path) -> str:
    return str(build_backbone(folder, "gpt2", seed=3, hidden=32, layers=2))


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
