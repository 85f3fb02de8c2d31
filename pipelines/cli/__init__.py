"""`prefixfleet` console script: each module below registers its commands on the shared app."""
from __future__ import annotations

import importlib

from pipelines.cli.app import app

# Command modules; each is imported for its @app.command registrations.
_COMMAND_MODULES = ("backbone_cmds", "registry_cmds", "train_cmds", "schedule_cmds", "serve_cmds")

for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(f"pipelines.cli.{_name}")
    except ModuleNotFoundError as exc:  # a module not written yet
        if exc.name != f"pipelines.cli.{_name}":
            raise


def main() -> None:
    app()
