"""Incremental detokenizing: after every token, what was read is a prefix of decoding every token
so far, and it catches up with it whenever that decode ends in a whole character — for a
byte-per-token tokenizer, a byte-level BPE and a SentencePiece-style BPE with byte fallback."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import PreTrainedTokenizerFast

from prefixfleet.pipelines.serving.detokenizer import UNFINISHED, IncrementalText
from prefixfleet.workers.pretrain import bpe_tokenizer
from prefixfleet.workers.tiny import SPECIAL_TOKENS, byte_tokenizer

CORPUS = ["Hello there, order 3 kites for Bo.", "Grüße aus Köln — 12 Äpfel, 3 €", "日本語のテキスト and emoji 🎉🎈",
          "  leading spaces\tand tabs\nnew lines .. , ;"] * 20


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama's layout: ▁ for spaces, a leading space stripped on decode, unknown bytes as <0xNN>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=[*SPECIAL_TOKENS, *byte_tokens],
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"bytes": byte_tokenizer(), "byte-level BPE": bpe_tokenizer(CORPUS, 400),
              "sentencepiece-like": _sentencepiece_like()}


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=st.data())
def test_what_is_read_is_the_whole_decode_so_far(name, data):
    tok = TOKENIZERS[name]
    ids = data.draw(st.one_of(
        st.lists(st.integers(0, len(tok) - 1), max_size=40),  # anything, broken characters included
        st.sampled_from(CORPUS).map(lambda text: tok(text, add_special_tokens=False).input_ids)))

    def decode(tokens: list[int]) -> str:
        return tok.decode(tokens, skip_special_tokens=True)

    reader = IncrementalText(decode)
    for n in range(1, len(ids) + 1):
        read = reader.read(ids[:n])
        whole = decode(ids[:n])
        assert whole.startswith(read)
        if not whole.endswith(UNFINISHED) and UNFINISHED not in whole:
            assert read == whole


def test_a_long_row_decodes_short_windows():
    tok = TOKENIZERS["byte-level BPE"]
    ids = tok(" ".join(CORPUS), add_special_tokens=False).input_ids
    widest = []

    def decode(tokens: list[int]) -> str:
        widest.append(len(tokens))
        return tok.decode(tokens, skip_special_tokens=True)

    reader = IncrementalText(decode)
    for n in range(1, len(ids) + 1):
        reader.read(ids[:n])
    assert reader.text == tok.decode(ids, skip_special_tokens=True) and len(ids) > 500
    assert max(widest) <= 4
