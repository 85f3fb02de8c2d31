"""Serving isolation (invariant 3): in one batch where every row carries another user's prefix and
another prompt length, each row's greedy tokens equal generating for that user alone — for every
family and every method."""
from __future__ import annotations

import pytest
import torch

from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.generate import generate_ids
from prefixfleet.workers.prefix import PrefixTensors, expected_shapes
from prefixfleet.workers.spec import METHODS, PrefixSpec
from prefixfleet.workers.tiny import SPECIAL_TOKENS
from tests.fixtures.backbones import FAMILIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ("order 3 kite for Bo\n", "hi", "order 9 lamp for Kim, and a longer note\n", "Dear Ana", "x",
           "order 1 mug for Jo\n")
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def backbones(tiny_backbones) -> dict[str, Backbone]:
    """Tiny backbones that never stop early: random tiny models emit end-of-sequence or padding at
    once, which would make every row trivially equal. Without special tokens each row runs its full
    length and its tokens depend on its prefix."""
    out = {}
    for family in FAMILIES:
        backbone = tiny_backbones.load(family)
        backbone.model.generation_config.eos_token_id = None
        backbone.model.generation_config.suppress_tokens = list(range(len(SPECIAL_TOKENS)))
        out[family] = backbone
    return out


def user_prefixes(backbone: Backbone, spec: PrefixSpec, users: int) -> list[PrefixTensors]:
    generator = torch.Generator().manual_seed(7)
    shapes = expected_shapes(backbone, spec)
    return [{name: torch.randn(shape, generator=generator) for name, shape in shapes.items()} for _ in range(users)]


def alone(backbone: Backbone, prefixes: list[PrefixTensors], prompts: tuple[str, ...]) -> list[list[int]]:
    return [generate_ids(backbone, [p], [q], max_new_tokens=NEW_TOKENS)[0] for p, q in zip(prefixes, prompts, strict=True)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_row_of_a_mixed_batch_equals_its_user_alone(backbones, family, method):
    backbone = backbones[family]
    prefixes = user_prefixes(backbone, PrefixSpec(method=method, num_virtual_tokens=5), len(PROMPTS))

    mixed = generate_ids(backbone, prefixes, PROMPTS, max_new_tokens=NEW_TOKENS)

    expected = alone(backbone, prefixes, PROMPTS)
    assert mixed == expected
    assert all(len(row) == NEW_TOKENS for row in mixed)
    # The rows read their own prefixes: handing row i another user's prefix changes some output.
    shifted = generate_ids(backbone, prefixes[1:] + prefixes[:1], PROMPTS, max_new_tokens=NEW_TOKENS)
    assert shifted != mixed


def test_rows_that_finish_early_keep_their_own_length(backbones):
    backbone = backbones["gpt2"]
    prefixes = user_prefixes(backbone, PrefixSpec(method="ptuning-v2", num_virtual_tokens=5), len(PROMPTS))
    config = backbone.model.generation_config
    config.eos_token_id = alone(backbone, prefixes, PROMPTS)[0][2]  # row 0 stops by its third token
    try:
        expected = alone(backbone, prefixes, PROMPTS)
        mixed = generate_ids(backbone, prefixes, PROMPTS, max_new_tokens=NEW_TOKENS)
    finally:
        config.eos_token_id = None
    assert mixed == expected
    assert len({len(row) for row in mixed}) > 1
