"""An older commit of the product, importable as `prefixfleet.*` from a `git worktree`: the
anchor a benchmark runs beside today's code."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def old_package(root: Path, commit: str) -> Path:
    """A folder to put first on PYTHONPATH so that `prefixfleet.*` imports `commit`, checked out
    under `root`; `remove_old_package(root)` takes the worktree away again."""
    tree = root / "old-tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit],
                   check=True, capture_output=True)
    shim = root / "old-shim" / "prefixfleet"
    shim.mkdir(parents=True)
    for room in ("workers", "registry", "pipelines"):
        (shim / room).symlink_to(tree / room)
    return shim.parent


def remove_old_package(root: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(root / "old-tree")],
                   capture_output=True)
