"""The one Typer app every command module registers on."""
from __future__ import annotations

import typer

app = typer.Typer(
    name="prefixfleet",
    help="Per-user prefix tuning on one frozen backbone: train on Ray, track in MLflow + S3, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
