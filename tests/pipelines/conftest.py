"""Fixtures shared by the pipelines tests."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from prefixfleet.workers.backbone import Backbone


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models generate fastest on one intra-op thread; on a busy 2-core machine several times
    faster than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backbone(tiny_backbones) -> Backbone:
    """The default tiny backbone, loaded once per module (a module may define its own)."""
    return tiny_backbones.load()
