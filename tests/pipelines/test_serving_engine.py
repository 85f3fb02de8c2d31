"""The continuous-batching engine: rows of different users, methods and settings share steps,
join while others run and leave when they end; each row's greedy tokens equal its user alone, a
seeded row samples the same tokens whoever shares its steps, stop strings and cancels end a row,
and the KV budget bounds the cache whatever arrives."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from prefixfleet.pipelines.serving.engine import Cancelled, Engine, RowSettings, row_need
from prefixfleet.workers.backbone import Backbone, load_backbone
from prefixfleet.workers.decoding import prompt_ids
from prefixfleet.workers.generate import generate_ids
from prefixfleet.workers.prefix import PrefixTensors, expected_shapes
from prefixfleet.workers.sampling import Sampling
from prefixfleet.workers.spec import PrefixSpec
from prefixfleet.workers.tiny import SPECIAL_TOKENS
from tests.fixtures.backbones import FAMILIES
from tests.pipelines.serving_support import PROMPTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLED = Sampling(do_sample=True, temperature=0.8, top_k=50, top_p=0.95)


def printable_only(backbone: Backbone) -> Backbone:
    """A tiny backbone that never ends a row early (random tiny models emit end-of-sequence at once)
    and writes printable ASCII only, so that stop strings can be picked from its text."""
    config = backbone.model.generation_config
    config.eos_token_id = None
    printable = {i for i in range(len(SPECIAL_TOKENS), backbone.config.vocab_size)
                 if (c := backbone.tokenizer.decode([i])).isascii() and c.isprintable() and len(c) == 1}
    config.suppress_tokens = [i for i in range(backbone.config.vocab_size) if i not in printable]
    return backbone


@pytest.fixture(scope="module", params=["gpt2", "t5"])
def backbone(request, tiny_backbones) -> Backbone:
    return printable_only(tiny_backbones.load(request.param))


def prefix(backbone: Backbone, method: str, length: int, seed: int) -> PrefixTensors:
    generator = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(backbone, PrefixSpec(method=method, num_virtual_tokens=length))
    return {name: 5 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def alone(backbone: Backbone, tensors: PrefixTensors | None, prompt: str, new_tokens: int) -> list[int]:
    return generate_ids(backbone, [tensors], [prompt], max_new_tokens=new_tokens)[0]


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_rows_join_mid_flight_and_equal_each_user_alone(backbone):
    rows_join_mid_flight_and_equal_each_user_alone(backbone)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("gpt2", "t5")])
def test_every_other_family_serves_through_the_engine_as_alone(tiny_backbones, family):
    rows_join_mid_flight_and_equal_each_user_alone(printable_only(tiny_backbones.load(family)))


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_a_backbone_in_half_precision_serves_as_alone(tiny_backbones, family):
    """What a GPU server runs (the checkpoint's bf16): the engine's casts hold there too."""
    rows_join_mid_flight_and_equal_each_user_alone(
        printable_only(load_backbone(tiny_backbones.path(family), dtype=torch.bfloat16)))


def rows_join_mid_flight_and_equal_each_user_alone(backbone: Backbone) -> None:
    engine = Engine(backbone)
    jobs = [(prefix(backbone, "prefix", 5, 0), PROMPTS[0], 24), (prefix(backbone, "prompt", 3, 1), PROMPTS[1], 6),
            (prefix(backbone, "ptuning-v2", 7, 2), PROMPTS[2], 12), (None, PROMPTS[3], 9)]
    try:
        first = engine.submit(jobs[0][0], prompt_ids(backbone, jobs[0][1]), RowSettings(jobs[0][2]), user="u0")
        wait_for(lambda: len(first.tokens) >= 3)  # the others join a row already decoding
        rest = [engine.submit(t, prompt_ids(backbone, p), RowSettings(n), user=f"u{i}")
                for i, (t, p, n) in enumerate(jobs[1:], start=1)]
        done = [row.future.result(timeout=60) for row in [first, *rest]]
    finally:
        engine.close()
    assert [d.token_ids for d in done] == [alone(backbone, t, p, n) for t, p, n in jobs]
    assert [d.finish_reason for d in done] == ["length"] * 4
    assert done[0].rows_in_step == 4 and done[0].users_in_step == 4
    assert engine.stats.row_steps > engine.stats.steps  # steps were shared
    assert done[0].text == backbone.tokenizer.decode(done[0].token_ids, skip_special_tokens=True)


def test_a_seeded_row_samples_the_same_whoever_shares_its_steps(backbone):
    mine = prefix(backbone, "ptuning-v2", 4, 3)
    engine = Engine(backbone)
    try:
        by_itself = engine.submit(mine, prompt_ids(backbone, PROMPTS[0]), RowSettings(16, SAMPLED, seed=11))
        by_itself = by_itself.future.result(timeout=60).token_ids
        crowd = [engine.submit(prefix(backbone, "prefix", 6, s), prompt_ids(backbone, PROMPTS[s % 4]),
                               RowSettings(20, SAMPLED, seed=None if s % 2 else s)) for s in range(4)]
        shared = engine.submit(mine, prompt_ids(backbone, PROMPTS[0]), RowSettings(16, SAMPLED, seed=11))
        shared = shared.future.result(timeout=60)
        other_seed = engine.submit(mine, prompt_ids(backbone, PROMPTS[0]), RowSettings(16, SAMPLED, seed=12))
        other_seed = other_seed.future.result(timeout=60).token_ids
        for row in crowd:
            row.future.result(timeout=60)
    finally:
        engine.close()
    assert shared.rows_in_step > 1
    assert shared.token_ids == by_itself
    assert other_seed != by_itself


def test_a_stop_string_ends_the_row_and_the_streamed_text_is_the_answer(backbone):
    tensors = prefix(backbone, "prefix", 5, 4)
    full = backbone.tokenizer.decode(alone(backbone, tensors, PROMPTS[0], 20), skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip() and full.find(stop) > 0
    pieces: list[str] = []
    engine = Engine(backbone)
    try:
        row = engine.submit(tensors, prompt_ids(backbone, PROMPTS[0]), RowSettings(20, stop=("never seen", stop)),
                            on_text=pieces.append)
        done = row.future.result(timeout=60)
    finally:
        engine.close()
    assert done.finish_reason == "stop"
    assert done.text == full[: full.find(stop)]
    assert "".join(pieces) == done.text
    assert len(done.token_ids) < 20


def test_the_kv_budget_bounds_the_cache_and_refuses_what_never_fits(backbone):
    jobs = [(prefix(backbone, "prefix", 4, s), PROMPTS[s % 4], 10 + s) for s in range(6)]
    needs = [row_need(backbone, t, len(prompt_ids(backbone, p)), n).total for t, p, n in jobs]
    budget = 2 * max(needs)  # two of the longest fit at once, never all six
    assert budget < len(jobs) * min(needs)
    engine = Engine(backbone, max_rows=8, kv_budget=budget)
    try:
        rows = [engine.submit(t, prompt_ids(backbone, p), RowSettings(n), user=i) for i, (t, p, n) in enumerate(jobs)]
        done = [row.future.result(timeout=120) for row in rows]
        with pytest.raises(ValueError, match=f"KV budget of {budget}"):
            engine.submit(None, prompt_ids(backbone, PROMPTS[0]), RowSettings(budget))
    finally:
        engine.close()
    assert [d.token_ids for d in done] == [alone(backbone, t, p, n) for t, p, n in jobs]
    assert 2 <= engine.stats.peak_rows < len(jobs)
    assert engine.stats.peak_cached_tokens <= engine.kv_budget


def test_a_cancelled_row_frees_its_slot_and_a_bad_row_fails_alone(backbone):
    engine = Engine(backbone, max_rows=1)
    try:
        long = engine.submit(None, prompt_ids(backbone, PROMPTS[0]), RowSettings(400))
        waiting = engine.submit(prefix(backbone, "prefix", 3, 5), prompt_ids(backbone, PROMPTS[1]), RowSettings(5))
        wait_for(lambda: len(long.tokens) >= 2)
        assert not waiting.future.done()  # the one slot is taken
        long.cancel()
        with pytest.raises(Cancelled):
            long.future.result(timeout=60)
        assert len(waiting.future.result(timeout=60).token_ids) == 5
        broken = {"decoder": torch.zeros(1, 2, 3)}  # not a prefix of this backbone
        bad = engine.submit(broken, prompt_ids(backbone, PROMPTS[2]), RowSettings(4))
        good = engine.submit(None, prompt_ids(backbone, PROMPTS[2]), RowSettings(4))
        with pytest.raises(Exception):  # noqa: B017 - whatever the model raises, it is this row's
            bad.future.result(timeout=60)
        assert len(good.future.result(timeout=60).token_ids) == 4
    finally:
        engine.close()


def test_a_seed_the_generator_refuses_fails_its_row_and_the_engine_serves_on(backbone):
    engine = Engine(backbone)
    try:
        bad = engine.submit(None, prompt_ids(backbone, PROMPTS[0]), RowSettings(4, SAMPLED, seed=2**70))
        good = engine.submit(None, prompt_ids(backbone, PROMPTS[1]), RowSettings(4, SAMPLED, seed=1))
        with pytest.raises(Exception, match="[Oo]verflow"):
            bad.future.result(timeout=60)
        assert len(good.future.result(timeout=60).token_ids) == 4
        later = engine.submit(None, prompt_ids(backbone, PROMPTS[2]), RowSettings(4))
        assert later.future.result(timeout=60).token_ids == alone(backbone, None, PROMPTS[2], 4)
    finally:
        engine.close()


def test_a_step_that_raises_fails_its_rows_and_the_engine_serves_on(backbone, monkeypatch):
    from prefixfleet.pipelines.serving import engine as engine_module

    real, calls = engine_module.next_tokens, []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(*args)

    monkeypatch.setattr(engine_module, "next_tokens", fails_once)
    engine = Engine(backbone)
    try:
        hit = engine.submit(None, prompt_ids(backbone, PROMPTS[0]), RowSettings(4, SAMPLED, seed=1))
        with pytest.raises(RuntimeError, match="probability tensor"):
            hit.future.result(timeout=60)
        later = engine.submit(None, prompt_ids(backbone, PROMPTS[2]), RowSettings(4))
        assert later.future.result(timeout=60).token_ids == alone(backbone, None, PROMPTS[2], 4)
    finally:
        engine.close()


def test_end_of_sequence_ends_a_row_and_close_finishes_what_was_submitted(tiny_backbones):
    backbone = tiny_backbones.load("llama")  # its own generation config: rows end at end-of-sequence
    engine = Engine(backbone)
    rows = [engine.submit(prefix(backbone, "prompt", 4, s), prompt_ids(backbone, PROMPTS[s]), RowSettings(12))
            for s in range(4)]
    closing = threading.Thread(target=engine.close)
    closing.start()
    closing.join(timeout=60)
    done = [row.future.result(timeout=0) for row in rows]
    assert [d.token_ids for d in done] == [alone(backbone, prefix(backbone, "prompt", 4, s), PROMPTS[s], 12)
                                           for s in range(4)]
    eos = backbone.model.generation_config.eos_token_id
    assert {d.finish_reason for d in done if d.token_ids[-1] == eos} <= {"stop"}
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(None, prompt_ids(backbone, PROMPTS[0]))
