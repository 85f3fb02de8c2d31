"""Iteration-level decoding (invariant 3 for continuous batching): rows of different users,
methods and prefix lengths share decode steps, join mid-flight and leave early, and each row's
greedy tokens equal transformers' `generate` for that user alone — for every family."""
from __future__ import annotations

import math

import pytest
import torch

from prefixfleet.workers import decoding
from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.generate import generate_ids
from prefixfleet.workers.prefix import PrefixTensors, expected_shapes, served_form
from prefixfleet.workers.sampling import Sampling, next_tokens, row_generator
from prefixfleet.workers.spec import PrefixSpec
from prefixfleet.workers.tiny import SPECIAL_TOKENS
from tests.fixtures.backbones import FAMILIES

# (method, prefix length, prompt, step at which the row joins, new tokens): every method, three
# prefix lengths, a bare row, rows joining while others run, rows leaving before others, and rows
# of one layout but prompts of different lengths joining at the same step (one prefill).
ROWS = (("prefix", 5, "order 3 kite for Bo\n", 0, 10), ("prompt", 3, "hi", 0, 4),
        ("prompt", 3, "order 9 lamp for Kim, and a longer note\n", 0, 7),
        ("ptuning-v2", 7, "Dear Ana", 2, 9), ("ptuning-v2", 7, "x", 2, 5), (None, 0, "order 1 mug for Jo\n", 3, 6),
        ("prompt", 5, "ship 12 mugs", 5, 8), ("ptuning-v2", 2, "hello, world", 9, 3))
PROMPTS = tuple(prompt for _, _, prompt, _, _ in ROWS)


@pytest.fixture(scope="module")
def endless(tiny_backbones) -> dict[str, Backbone]:
    """Tiny backbones that never stop early (random tiny models emit end-of-sequence at once)."""
    out = {}
    for family in FAMILIES:
        backbone = tiny_backbones.load(family)
        backbone.model.generation_config.eos_token_id = None
        out[family] = backbone
    return out


def _prefix(backbone: Backbone, method: str | None, length: int, seed: int) -> PrefixTensors | None:
    if method is None:
        return None
    generator = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(backbone, PrefixSpec(method=method, num_virtual_tokens=length))
    # Strong prefixes: at unit scale a tiny random T5 answers every prefix alike.
    return {name: 5 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def _no_special(logits: torch.Tensor) -> torch.Tensor:
    logits[:, : len(SPECIAL_TOKENS)] = float("-inf")
    return logits


def _layout(prefix: PrefixTensors | None) -> tuple:
    return () if prefix is None else tuple(sorted((k, tuple(v.shape)) for k, v in prefix.items()))


def _run(backbone: Backbone, rows: list[tuple[PrefixTensors | None, str, int, int]]) -> tuple[list[list[int]], int]:
    """Decode `rows` (prefix, prompt, join step, new tokens) as the engine does: rows joining at one
    step are prefilled together by layout, all running rows share each step, a row leaves once it
    has its tokens. Returns each row's tokens and the most rows that shared one step."""
    out: list[list[int]] = [[] for _ in rows]
    running: list[int] = []
    state = logits = None
    widest, step = 0, 0
    while step == 0 or running:
        joining: dict[tuple, list[int]] = {}
        for i, (prefix, _, at, _) in enumerate(rows):
            if at == step:
                joining.setdefault(_layout(prefix), []).append(i)
        for group in joining.values():
            new, first = decoding.prefill(backbone, [rows[i][0] for i in group],
                                          [decoding.prompt_ids(backbone, rows[i][1]) for i in group])
            state, logits = decoding.join(state, new), first if logits is None else torch.cat([logits, first])
            running += group
        tokens = next_tokens(_no_special(logits), [Sampling()] * len(running), [None] * len(running))
        for i, token in zip(running, tokens.tolist(), strict=True):
            out[i].append(token)
        stay = [k for k, i in enumerate(running) if len(out[i]) < rows[i][3]]
        state, running = decoding.keep(state, stay), [running[k] for k in stay]
        if running:
            widest = max(widest, len(running))
            logits = decoding.decode_step(backbone, state, tokens[stay])
        else:
            state = logits = None
        step += 1
    return out, widest


def _alone(backbone: Backbone, prefix: PrefixTensors | None, prompt: str, new_tokens: int) -> list[int]:
    backbone.model.generation_config.suppress_tokens = list(range(len(SPECIAL_TOKENS)))
    try:
        return generate_ids(backbone, [prefix], [prompt], max_new_tokens=new_tokens)[0]
    finally:
        backbone.model.generation_config.suppress_tokens = None


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_joining_and_leaving_equal_each_user_alone(endless, family):
    backbone = endless[family]
    rows = [(_prefix(backbone, method, length, seed), prompt, at, new)
            for seed, (method, length, prompt, at, new) in enumerate(ROWS)]
    alone = [_alone(backbone, prefix, prompt, new) for prefix, prompt, _, new in rows]
    # As a server holds them: a decoder-only model's soft prompts as the keys/values they make.
    rows = [(prefix and served_form(backbone, prefix), *rest) for prefix, *rest in rows]

    mixed, widest = _run(backbone, rows)

    assert widest >= 4  # rows of every method and three prefix lengths shared steps
    assert mixed == alone
    # Each row reads its own prefix: passing the prefixes of each method on to the next row of
    # that method changes tokens.
    swapped = list(rows)
    for method in ("prefix", "prompt", "ptuning-v2"):
        same = [i for i, row in enumerate(ROWS) if row[0] == method]
        for i, j in zip(same, same[1:] + same[:1], strict=True):
            swapped[j] = (rows[i][0], *rows[j][1:])
    assert _run(backbone, swapped)[0] != mixed


@pytest.mark.parametrize("family", FAMILIES)
def test_a_soft_prompt_is_served_as_the_keys_and_values_it_makes(endless, family):
    backbone = endless[family]
    deep, prompt = (_prefix(backbone, method, 3, 0) for method in ("ptuning-v2", "prompt"))
    assert served_form(backbone, deep) is deep
    served = served_form(backbone, prompt)
    if backbone.family.encoder_decoder:  # it goes into the encoder, which reads it with the input
        assert served is prompt
        return
    deep_shapes = expected_shapes(backbone, PrefixSpec("ptuning-v2", 3))
    assert {k: v.shape for k, v in served.items()} == {"decoder": deep_shapes["decoder"]}
    ids = decoding.prompt_ids(backbone, PROMPTS[0])
    raw = decoding.prefill(backbone, [prompt], [ids])[1]
    torch.testing.assert_close(decoding.prefill(backbone, [served], [ids])[1], raw, rtol=1e-4, atol=1e-4)


def test_a_prefill_of_several_rows_closes_up_each_row_s_cache(endless):
    backbone = endless["llama"]
    prefixes = [_prefix(backbone, "ptuning-v2", 4, s) for s in range(2)]
    rows, _ = decoding.prefill(backbone, prefixes, [decoding.prompt_ids(backbone, p) for p in ("a", "abcdef")])
    assert rows.mask.tolist() == [[0] * 5 + [1] * 5, [1] * 10]
    assert rows.positions.tolist() == [5, 10]


def test_a_row_s_cache_shrinks_when_the_longest_row_leaves(endless):
    backbone = endless["gpt2"]
    long, _ = decoding.prefill(backbone, [None], [decoding.prompt_ids(backbone, PROMPTS[2])])
    short, _ = decoding.prefill(backbone, [None], [decoding.prompt_ids(backbone, PROMPTS[1])])
    both = decoding.join(long, short)
    assert both.length == long.length and len(both) == 2

    rest = decoding.keep(both, [1])

    assert rest.length == short.length
    assert [layer.keys.shape[-2] for layer in rest.cache.layers] == [short.length] * len(rest.cache.layers)


def test_a_seeded_row_draws_the_same_tokens_whoever_shares_its_step(endless):
    backbone = endless["llama"]
    how = Sampling(do_sample=True, temperature=0.9, top_k=40, top_p=0.9)

    def draw(shared: bool) -> list[int]:
        rows, logits = decoding.prefill(backbone, [None], [decoding.prompt_ids(backbone, PROMPTS[0])])
        settings, generators = [how], [row_generator(7, backbone.device)]
        if shared:  # a sampled neighbour with another prefix, ahead of it in the batch
            other, first = decoding.prefill(backbone, [_prefix(backbone, "prefix", 4, 1)],
                                            [decoding.prompt_ids(backbone, PROMPTS[3])])
            rows, logits = decoding.join(other, rows), torch.cat([first, logits])
            settings, generators = [Sampling(do_sample=True), how], [row_generator(None, backbone.device), *generators]
        tokens = []
        for _ in range(12):
            step = next_tokens(logits, settings, generators)
            tokens.append(int(step[-1]))
            logits = decoding.decode_step(backbone, rows, step)
        return tokens

    alone = draw(shared=False)
    assert draw(shared=True) == alone
    assert len(set(alone)) > 1


def test_a_tiny_temperature_draws_the_most_likely_token_and_an_infinite_one_is_refused():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 30
    logits[:, :5] = float("-inf")  # suppressed tokens, as the engine masks them
    for temperature in (1e-30, 1e-40, 1e-300, 5e-324):
        settings = [Sampling(do_sample=True, temperature=temperature, top_k=k, top_p=p)
                    for k, p in ((0, 1), (5, 1), (0, .5), (3, .9))]
        generators = [row_generator(seed, torch.device("cpu")) for seed in range(4)]
        assert torch.equal(next_tokens(logits, settings, generators), logits.argmax(-1)), temperature
    for temperature in (math.inf, math.nan, 0.0):
        with pytest.raises(WorkerError, match="finite temperature"):
            Sampling(do_sample=True, temperature=temperature)
