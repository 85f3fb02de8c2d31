"""The demo's backbone that can write: a tokenizer learnt from the corpus and a GPT-2 pretrained on
it, loaded like any model; and the style check the demo reads generations with."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from prefixfleet.workers.backbone import load_backbone, weights_checksum
from prefixfleet.workers.generate import generate
from prefixfleet.workers.pretrain import Pretraining, bpe_tokenizer, is_pretrained, pretrain_backbone
from prefixfleet.workers.synthetic import STYLES, any_style_records, style_of
from prefixfleet.workers.tiny import BOS_ID, EOS_ID, PAD_ID

SMALL = Pretraining(hidden=32, layers=1, heads=2, context=64, vocab_size=400, batch_size=32, lr=2e-2,
                   warmup_steps=5)


def test_the_tokenizer_learns_the_corpus_words_and_still_round_trips_any_text():
    tok = bpe_tokenizer((p + c for p, c in any_style_records(500)), 400)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (PAD_ID, EOS_ID, BOS_ID)
    assert len(tok("order 3 kettle for Ana\n", add_special_tokens=False).input_ids) <= 6  # words, not bytes
    for text in ("Grüße aus Köln 🙂", "tabs\tand\nnewlines", "ÿ\x00\x7f"):
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_any_style_records_cover_many_styles_with_style_free_prompts():
    records = any_style_records(2000)
    assert len({completion.split()[0].lower() for _, completion in records}) == 8  # every greeting
    assert all(prompt.startswith("order ") and prompt.endswith("\n") for prompt, _ in records)
    assert sum(any(style_of(i).carried_by(c) for i in range(STYLES)) for _, c in records) == len(records)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, float]:
    records = any_style_records(1280)
    out = tmp_path_factory.mktemp("pretrained") / "backbone"
    return out, records, pretrain_backbone(out, records, SMALL)


def test_pretraining_learns_the_corpus_and_writes_a_backbone_that_loads(pretrained):
    out, records, final_loss = pretrained
    assert final_loss < 0.5 * math.log(SMALL.vocab_size)  # far below a uniform guess over the vocabulary
    backbone = load_backbone(str(out))
    assert backbone.family.name == "gpt2" and backbone.max_positions == SMALL.context
    text, = generate(backbone, [None], [records[0][0]], max_new_tokens=8)
    assert text.strip()
    assert not list(out.parent.glob(".backbone-*"))  # the staging folder was moved into place


def test_is_pretrained_names_exactly_the_records_and_settings_it_was_made_from(pretrained):
    out, records, _ = pretrained
    assert is_pretrained(out, records, SMALL)
    assert not is_pretrained(out, records[:-1], SMALL)
    assert not is_pretrained(out, list(reversed(records)), SMALL)
    assert not is_pretrained(out, records, replace(SMALL, lr=1e-3))
    assert not is_pretrained(out.parent / "elsewhere", records, SMALL)


def test_the_same_records_and_settings_make_the_same_weights(pretrained, tmp_path: Path):
    out, records, _ = pretrained
    again = tmp_path / "again"
    pretrain_backbone(again, records, SMALL)
    assert weights_checksum(load_backbone(str(again)).model) == weights_checksum(load_backbone(str(out)).model)


def test_too_few_records_for_one_batch_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="make no batch of 32"):
        pretrain_backbone(tmp_path / "b", any_style_records(31), SMALL)
    assert not (tmp_path / "b").exists()


def test_the_style_check_wants_the_users_greeting_and_sign_off_in_their_case():
    plain, shout = style_of(0), style_of(56)  # Hi … Thanks!, and the same in capitals
    assert (plain.greeting, plain.closing, plain.shout, shout.shout) == ("Hi", "Thanks!", False, True)
    assert plain.carried_by(" Hi Gus - 4 chair on the way. Thanks! ")
    assert shout.carried_by("HI GUS - 4 CHAIR ON THE WAY. THANKS!")
    for text in ("Hi Gus - 4 chair on the way. Cheers.", "Hey Gus - 4 chair on the way. Thanks!",
                 "Hiya Gus - 4 chair on the way. Thanks!", "HI GUS - 4 CHAIR ON THE WAY. THANKS!"):
        assert not plain.carried_by(text), text
    assert not shout.carried_by("Hi Gus - 4 chair on the way. Thanks!")
