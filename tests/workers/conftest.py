"""Tiny backbones built locally once per test session, loaded through from_pretrained(path)."""
from __future__ import annotations

import pytest
import torch

from prefixfleet.workers.backbone import Backbone, load_backbone
from prefixfleet.workers.data import Example
from prefixfleet.workers.synthetic import user_rows
from prefixfleet.workers.tiny import build_backbone

FAMILIES = ("gpt2", "llama", "t5")


@pytest.fixture(scope="session")
def backbone_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("backbones")
    return {family: str(build_backbone(root / family, family, seed=1)) for family in FAMILIES}


@pytest.fixture(scope="session")
def backbones(backbone_dirs) -> dict[str, Backbone]:
    return {family: load_backbone(path) for family, path in backbone_dirs.items()}


def examples_for(user_index: int, count: int = 24) -> list[Example]:
    return [Example(prompt=r["prompt"], completion=r["completion"]) for r in user_rows(user_index, count)]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
