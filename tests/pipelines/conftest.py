"""Fixtures shared by the pipelines tests."""
from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """Ray on this machine with 2 CPUs, started once for the session (or the one already running)."""
    import ray

    from prefixfleet.pipelines.cluster import LOCAL_OBJECT_STORE_BYTES

    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
             logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models generate fastest on one intra-op thread; on a busy 2-core machine several times
    faster than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
