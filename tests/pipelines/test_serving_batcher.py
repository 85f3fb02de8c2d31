"""The batcher puts requests of different users into one forward pass, splits only what cannot
share one (prefix layout, generation parameters), and keeps a bad row from failing its neighbours."""
from __future__ import annotations

import threading
import time

import pytest

from prefixfleet.pipelines.serving import batcher as batcher_module
from prefixfleet.pipelines.serving.batcher import Batcher, GenerationParams
from prefixfleet.pipelines.serving.cache import ServedPrefix
from prefixfleet.registry import VersionRef
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.generate import generate_ids
from prefixfleet.workers.prefix import PrefixTensors
from tests.pipelines.serving_support import NEW_TOKENS, PROMPTS, SPEC, random_prefix

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = GenerationParams(max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def backbone(tiny_backbones):
    return tiny_backbones.load()


@pytest.fixture
def forward_passes(monkeypatch) -> list[int]:
    """Rows of every generate_ids call the batcher makes."""
    calls: list[int] = []

    def counted(backbone, prefixes, prompts, **kwargs):
        calls.append(len(prompts))
        return generate_ids(backbone, prefixes, prompts, **kwargs)

    monkeypatch.setattr(batcher_module, "generate_ids", counted)
    return calls


def served(user: str, tensors: PrefixTensors, tokens: int = SPEC.num_virtual_tokens) -> ServedPrefix:
    ref = VersionRef("default", user, 1, ["production"], "0" * 64, 0, "file:///x", "fp", "data",
                     {"method": SPEC.method, "num_virtual_tokens": tokens}, {}, None, "")
    return ServedPrefix(ref, tensors)


def test_different_users_share_one_forward_pass(backbone, forward_passes):
    prefixes = [served(f"u{i}", random_prefix(backbone, i)) for i in range(len(PROMPTS))]
    batcher = Batcher(backbone, max_batch_size=8, max_wait_ms=500, max_delay_ms=2000)
    try:
        futures = [batcher.submit(p, q, GREEDY) for p, q in zip(prefixes, PROMPTS, strict=True)]
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    assert forward_passes == [len(PROMPTS)]
    assert {(r.batch_size, r.users_in_batch) for r in results} == {(len(PROMPTS), len(PROMPTS))}
    for p, q, r in zip(prefixes, PROMPTS, results, strict=True):
        assert r.token_ids == generate_ids(backbone, [p.tensors], [q], max_new_tokens=NEW_TOKENS)[0]
    # user 0's prefix answers the others' prompts differently: a row served the wrong prefix would show
    borrowed = [generate_ids(backbone, [prefixes[0].tensors], [q], max_new_tokens=NEW_TOKENS)[0] for q in PROMPTS[1:]]
    assert borrowed != [r.token_ids for r in results[1:]]


def test_layouts_and_parameters_that_differ_run_apart(backbone, forward_passes):
    short = SPEC.with_(num_virtual_tokens=3)
    batcher = Batcher(backbone, max_batch_size=8, max_wait_ms=500, max_delay_ms=2000)
    try:
        futures = [
            batcher.submit(served("a", random_prefix(backbone, 1)), PROMPTS[0], GREEDY),
            batcher.submit(served("b", random_prefix(backbone, 2)), PROMPTS[1], GREEDY),
            batcher.submit(served("c", random_prefix(backbone, 3, short), 3), PROMPTS[2], GREEDY),
            batcher.submit(served("d", random_prefix(backbone, 4)), PROMPTS[3], GenerationParams(max_new_tokens=3)),
        ]
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    assert sorted(forward_passes) == [1, 1, 2]
    assert [r.batch_size for r in results] == [2, 2, 1, 1]
    assert len(results[3].token_ids) <= 3


def test_max_batch_size_caps_a_forward_pass(backbone, forward_passes):
    batcher = Batcher(backbone, max_batch_size=2, max_wait_ms=500, max_delay_ms=2000)
    try:
        futures = [batcher.submit(served(f"u{i}", random_prefix(backbone, i)), PROMPTS[i], GREEDY) for i in range(4)]
        [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    assert forward_passes == [2, 2]


def test_after_a_batch_of_n_the_next_waits_for_n_again(backbone, monkeypatch):
    """Clients answered together come back together: after a pass of 3 rows the batcher waits (up to
    max_delay_ms) for 3 again, where the quiet gap alone would have closed the batch."""
    passes: list[int] = []
    entered, release = threading.Event(), threading.Event()

    def held(backbone, prefixes, prompts, **kwargs):
        passes.append(len(prompts))
        entered.set()
        release.wait(timeout=60)
        return generate_ids(backbone, prefixes, prompts, **kwargs)

    monkeypatch.setattr(batcher_module, "generate_ids", held)
    batcher = Batcher(backbone, max_batch_size=8, max_wait_ms=1, max_delay_ms=3000)
    prefix = served("u", random_prefix(backbone, 1))
    try:
        first = batcher.submit(prefix, PROMPTS[0], GREEDY)
        assert entered.wait(timeout=60)
        queued = [batcher.submit(prefix, p, GREEDY) for p in PROMPTS[1:]]  # 3 wait behind the first pass
        release.set()
        [f.result(timeout=60) for f in [first, *queued]]
        late = [batcher.submit(prefix, PROMPTS[0], GREEDY)]
        time.sleep(0.3)  # far beyond the 1 ms quiet gap, well within the 3 s delay
        late += [batcher.submit(prefix, p, GREEDY) for p in PROMPTS[1:3]]
        [f.result(timeout=60) for f in late]
    finally:
        release.set()
        batcher.close()
    assert passes == [1, 3, 3]


def test_a_bad_row_fails_alone(backbone):
    batcher = Batcher(backbone, max_batch_size=8, max_wait_ms=500, max_delay_ms=2000)
    try:
        good = batcher.submit(served("good", random_prefix(backbone, 1)), PROMPTS[0], GREEDY)
        bad = batcher.submit(served("bad", random_prefix(backbone, 2)), "", GREEDY)  # tokenizes to nothing
        assert good.result(timeout=60).token_ids
        with pytest.raises(WorkerError, match="tokenizes to nothing"):
            bad.result(timeout=60)
    finally:
        batcher.close()


def test_close_finishes_queued_requests_then_refuses_new_ones(backbone):
    batcher = Batcher(backbone, max_batch_size=8, max_wait_ms=50, max_delay_ms=50)
    queued = batcher.submit(served("a", random_prefix(backbone, 1)), PROMPTS[0], GREEDY)
    batcher.close()
    assert queued.result(timeout=0).token_ids
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(served("a", random_prefix(backbone, 1)), PROMPTS[0], GREEDY)
