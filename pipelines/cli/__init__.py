"""`prefixfleet` console script: each module below registers its commands on the shared app."""
from __future__ import annotations

from prefixfleet.pipelines.cli import backbone_cmds, forget_cmds, registry_cmds, schedule_cmds, serve_cmds, train_cmds  # noqa: F401
from prefixfleet.pipelines.cli.app import app


def main() -> None:
    app()
