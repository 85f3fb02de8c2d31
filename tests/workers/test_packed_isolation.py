"""Invariant 1, training isolation: a user's prefix is the same whether trained alone or packed
with other users, and nothing about user B (data, presence, a NaN) reaches user A.

Stated exactly (README, "Isolation"): every user's loss, gradient, clipping, optimizer state and
schedule are computed from that user's rows alone, so the only coupling left is floating-point:
MKL may sum a row's products in another order when the batch has another number of rows. On this
CPU that leaves 0.0 at 2 torch threads and up to 1.4e-5 at 1 thread after the tests' 6–20 steps;
the tests hold every thread count to PACKED_ATOL.
"""
from __future__ import annotations

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


def test_a_nan_producing_example_fails_its_user_alone(backbones):
    """User B's data carries a byte that the (test-poisoned) embedding turns into NaN."""
    backbone = backbones["gpt2"]
    poison = backbone.tokenizer("\x07", add_special_tokens=False).input_ids[0]
    embedding = backbone.model.get_input_embeddings()

    def nan_for_poison(module, inputs, output):
        return output.masked_fill((inputs[0] == poison).unsqueeze(-1), float("nan"))

    a, c = job(0), job(2)
    clean = train_users(backbone, [a, c], pack_size=3)
    bad_examples = [Example(prompt="order\x07 1 mug\n", completion="poisoned")] * 6
    handle = embedding.register_forward_hook(nan_for_poison)
    try:
        results = train_users(backbone, [a, job(1, examples=bad_examples), c], pack_size=3)
    finally:
        handle.remove()
    assert not results[1].ok and "user-1" in results[1].error and "non-finite" in results[1].error
    for mine, reference in ((results[0], clean[0]), (results[2], clean[1])):
        assert mine.ok
        for name in reference.tensors:
            assert torch.equal(mine.tensors[name], reference.tensors[name])


def test_users_with_different_specs_are_grouped_not_mixed(backbones):
    backbone = backbones["llama"]
    jobs = [job(0), job(1, spec=SPEC.with_(num_virtual_tokens=6)), job(2, spec=SPEC.with_(method="prompt"))]
    results = train_users(backbone, jobs, pack_size=8)
    assert [r.ok for r in results] == [True, True, True]
    assert results[1].tensors["decoder"].shape[3] == 6
    assert set(results[2].tensors) == {"prompt"}
