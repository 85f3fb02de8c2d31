"""Fixtures of the worker tests: one tiny backbone per family, loaded once per session."""
from __future__ import annotations

import pytest
import torch

from prefixfleet.workers.backbone import Backbone, load_backbone
from tests.fixtures.backbones import FAMILIES, TinyBackbones


@pytest.fixture(scope="session")
def backbone_dirs(tiny_backbones: TinyBackbones) -> dict[str, str]:
    return {family: tiny_backbones.path(family) for family in FAMILIES}


@pytest.fixture(scope="session")
def backbones(backbone_dirs: dict[str, str]) -> dict[str, Backbone]:
    return {family: load_backbone(path) for family, path in backbone_dirs.items()}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
