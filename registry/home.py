"""The home folder of the embedded defaults (sqlite MLflow, file:// store, job and schedule logs):
--home, else $PREFIXFLEET_HOME, else ~/.prefixfleet. The one place it is resolved."""
from __future__ import annotations

import os
from pathlib import Path


def home_dir(home: str | Path | None = None) -> Path:
    return Path(home or os.environ.get("PREFIXFLEET_HOME") or "~/.prefixfleet").expanduser().resolve()
