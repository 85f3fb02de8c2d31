"""The base package, installed alone into a clean venv as a user would (`pip install .`, versions
from the lock): only `prefixfleet` lands at top level, no torch, transformers or ray come with it,
and its CLI resolves a prefix the full install published. Commands of an extra say how to get it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prefixfleet.registry import Registry, UserKey
from tests.fixtures.artifacts import make_artifact

pytestmark = pytest.mark.install
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")  # a copy: pip builds in the tree it installs from
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for room in ("workers", "registry", "pipelines"):
        shutil.copytree(ROOT / room, source / room, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path_factory.mktemp("base-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(ROOT / "requirements.lock"),
                    str(source)], check=True, timeout=900, capture_output=True)
    return venv


def python(venv: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_only_prefixfleet_lands_at_top_level_and_no_deep_learning_stack(base_venv: Path, tmp_path: Path) -> None:
    listing = python(base_venv, "import importlib.metadata as m, json; print(json.dumps(sorted({f.parts[0] for f "
                                "in m.distribution('prefixfleet').files if f.parts[0] != '..'})))", tmp_path)
    assert json.loads(listing.stdout) == ["prefixfleet", "prefixfleet-0.1.0.dist-info"]  # '..': the bin/ script
    for module in ("workers", "registry", "pipelines", "torch", "transformers", "ray"):
        assert python(base_venv, f"import {module}", tmp_path).returncode != 0, module
    assert python(base_venv, "import prefixfleet.registry, prefixfleet.pipelines.cli", tmp_path).returncode == 0


def test_the_base_cli_resolves_a_prefix_and_names_the_extra_a_command_needs(base_venv: Path, local_env: dict,
                                                                          tmp_path: Path) -> None:
    artifact = make_artifact("default", "zoe")
    with Registry.from_env() as registry:
        key = UserKey("default", "zoe")
        registry.promote(key, registry.publish(key, artifact).version)
    cli = str(base_venv / "bin" / "prefixfleet")
    env = {"PREFIXFLEET_HOME": local_env["PREFIXFLEET_HOME"], "PATH": "/usr/bin:/bin"}
    out = tmp_path / "zoe.safetensors"
    got = subprocess.run([cli, "get", "zoe", "--json", "--out", str(out)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["version"] == 1 and out.read_bytes() == artifact
    train = subprocess.run([cli, "train", "data.jsonl", "--backbone", "x"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert train.returncode == 1
    assert "pip install 'prefixfleet[train]'" in train.stderr and "Traceback" not in train.stderr
