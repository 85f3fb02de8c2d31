"""Invariant 1, training isolation: a user's prefix is the same whether trained alone or packed
with other users, and nothing about user B (data, presence, a NaN) reaches user A.

Stated exactly (README, "Isolation"): every user's loss, gradient, clipping, optimizer state and
schedule are computed from that user's rows alone, so the only coupling left is floating-point:
MKL may sum a row's products in another order when the batch has another number of rows. On this
CPU that leaves 0.0 at 2 torch threads and up to 1.4e-5 at 1 thread after the tests' 6–20 steps;
the tests hold every thread count to PACKED_ATOL.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from prefixfleet.workers.data import Example
from prefixfleet.workers.spec import METHODS, PrefixSpec, TrainConfig
from prefixfleet.workers.trainer import UserRequest, train_users
from tests.fixtures.backbones import FAMILIES, examples_for

SPEC = PrefixSpec(method="prefix", num_virtual_tokens=4, reparam_hidden=32)
PACKED_ATOL = 1e-4  # packed vs alone, any thread count (float32, prefix values of order 1)


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}-threads")
def torch_threads(request) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def job(index: int, *, steps: int = 12, examples: list[Example] | None = None, spec: PrefixSpec = SPEC) -> UserRequest:
    return UserRequest(f"user-{index}", examples or examples_for(index, 10 + 3 * index),
                   spec, TrainConfig(steps=steps, batch_size=4))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_packed_of_eight_equals_alone(backbones, family, method, torch_threads):
    backbone = backbones[family]
    spec = SPEC.with_(method=method)
    # Different data sizes and step counts: users join and leave the pack as they finish.
    jobs = [job(i, steps=6 + 2 * i, spec=spec) for i in range(8)]
    packed = train_users(backbone, jobs, pack_size=8)
    for target in (0, 5):
        alone, = train_users(backbone, [jobs[target]], pack_size=1)
        assert packed[target].steps == alone.steps == jobs[target].config.steps
        assert max_abs_diff(packed[target].tensors, alone.tensors) <= PACKED_ATOL
        assert packed[target].loss_curve == pytest.approx(alone.loss_curve, abs=PACKED_ATOL)


def test_changing_or_removing_user_b_changes_no_bit_of_user_a(backbones, torch_threads):
    backbone = backbones["gpt2"]
    a, b, c = job(0), job(1), job(2)
    reference = train_users(backbone, [a, b, c], pack_size=3)[0]
    changed_b = UserRequest(b.user, examples_for(7, 25), b.spec, TrainConfig(steps=30, batch_size=4, lr=0.5))
    for others in ([changed_b, c], [c]):
        result = train_users(backbone, [a, *others], pack_size=3)[0]
        for name in reference.tensors:
            assert torch.equal(result.tensors[name], reference.tensors[name])
        assert result.loss_curve == reference.loss_curve


POISON = "\x07"


@contextlib.contextmanager
def poisoned(backbone) -> Iterator[None]:
    """The embedding turns the POISON byte into NaN (a stand-in for data that overflows)."""
    poison = backbone.tokenizer(POISON, add_special_tokens=False).input_ids[0]

    def nan_for_poison(module, inputs, output):
        return output.masked_fill((inputs[0] == poison).unsqueeze(-1), float("nan"))

    handle = backbone.model.get_input_embeddings().register_forward_hook(nan_for_poison)
    try:
        yield
    finally:
        handle.remove()


def test_a_nan_producing_example_fails_its_user_alone(backbones):
    backbone = backbones["gpt2"]
    a, c = job(0), job(2)
    clean = train_users(backbone, [a, c], pack_size=3)
    bad_examples = [Example(prompt=f"order{POISON} 1 mug\n", completion="poisoned")] * 6
    with poisoned(backbone):
        results = train_users(backbone, [a, job(1, examples=bad_examples), c], pack_size=3)
    assert not results[1].ok and "user-1" in results[1].error and "non-finite" in results[1].error
    for mine, reference in ((results[0], clean[0]), (results[2], clean[1])):
        assert mine.ok
        for name in reference.tensors:
            assert torch.equal(mine.tensors[name], reference.tensors[name])


def test_a_user_failing_mid_training_is_reported_as_alone_at_its_step_and_examples(backbones):
    """The pack reads failures back only at a sync; the report still names the step it happened."""
    backbone = backbones["gpt2"]
    examples = examples_for(1, 40) + [Example(prompt=f"order{POISON} 2 mugs\n", completion="poisoned")]
    b = UserRequest("user-1", examples, SPEC, TrainConfig(steps=40, batch_size=4), eval_examples=examples_for(1, 4))
    with poisoned(backbone):
        packed = train_users(backbone, [job(0, steps=40), b, job(2, steps=40)], pack_size=3)
        alone, = train_users(backbone, [b], pack_size=1)
    assert not packed[1].ok and packed[1].error == alone.error
    assert 0 < packed[1].steps == alone.steps < 40 and f"at step {alone.steps} " in alone.error
    assert packed[1].loss_curve == pytest.approx(alone.loss_curve, abs=PACKED_ATOL)
    assert packed[0].ok and packed[2].ok


def test_a_users_result_does_not_depend_on_its_slot(backbones):
    backbone = backbones["llama"]
    a, b, c = job(0), job(1), job(2)
    first = train_users(backbone, [a, b, c], pack_size=3)[0]
    last = train_users(backbone, [c, b, a], pack_size=3)[2]
    for name in first.tensors:
        assert torch.equal(first.tensors[name], last.tensors[name])
    assert first.loss_curve == last.loss_curve


def test_users_with_different_specs_are_grouped_not_mixed(backbones):
    backbone = backbones["llama"]
    jobs = [job(0), job(1, spec=SPEC.with_(num_virtual_tokens=6)), job(2, spec=SPEC.with_(method="prompt")),
            job(3, spec=SPEC.with_(reparam_hidden=8))]
    results = train_users(backbone, jobs, pack_size=8)
    assert [r.ok for r in results] == [True, True, True, True]
    assert results[1].tensors["decoder"].shape[3] == 6
    assert set(results[2].tensors) == {"prompt"}


BF16_EVAL_RTOL = 0.10  # bf16 vs float32 eval loss per user; measured ≤ 0.057 on the tiny backbones, 30 steps


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bfloat16_autocast_trains_float32_prefixes_within_the_stated_tolerance(backbones, family):
    backbone = backbones[family]
    jobs = {precision: [UserRequest(f"user-{i}", examples_for(i, 30), SPEC,
                                    TrainConfig(steps=20, batch_size=4, precision=precision)) for i in range(3)]
            for precision in ("float32", "bfloat16")}
    full, mixed = (train_users(backbone, jobs[p], pack_size=3) for p in ("float32", "bfloat16"))
    for exact, bf16 in zip(full, mixed, strict=True):
        assert bf16.ok and all(t.dtype == torch.float32 for t in bf16.tensors.values())
        assert bf16.loss_curve != exact.loss_curve  # autocast did run in bf16
        assert bf16.eval_loss == pytest.approx(exact.eval_loss, rel=BF16_EVAL_RTOL)
        assert bf16.eval_loss < bf16.baseline_eval_loss
