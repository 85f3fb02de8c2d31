"""Small random-init backbones with a byte-level tokenizer, written in save_pretrained layout.

No hub is needed: tests build these locally (the demo pretrains its own: `pretrain.py`), then load
them through the same `from_pretrained(path)` code a real model id goes through.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from prefixfleet.workers.errors import WorkerError

SPECIAL_TOKENS = ("<pad>", "</s>", "<s>", "<unk>")
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
INIT_RANGE = 0.3  # wide enough that a random model can express peaked distributions


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255, in byte order (what ByteLevel emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (plus pad/eos/bos/unk): any text round-trips, nothing to download."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in _byte_alphabet():
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


def _decoders(hidden: int) -> dict[str, tuple[type, type, dict]]:
    """Decoder-only model types: config class, model class, and what each needs beyond the shared
    sizes. Grouped-query attention with an explicit head_dim that is NOT hidden / heads where the
    type has one; no sliding window (one is refused at load)."""
    gqa = dict(num_key_value_heads=2, head_dim=hidden // 2)
    return {
        "llama": (LlamaConfig, LlamaForCausalLM, gqa),
        "mistral": (MistralConfig, MistralForCausalLM, {**gqa, "sliding_window": None}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 2}),  # head_dim is hidden / heads
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, gqa),  # + per-head q/k norms
        "mixtral": (MixtralConfig, MixtralForCausalLM,  # mixture of experts
                    {**gqa, "sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2}),
        "phi3": (Phi3Config, Phi3ForCausalLM, {"num_key_value_heads": 2, "sliding_window": None,
                                               "original_max_position_embeddings": 512}),
        "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM, {"rotary_pct": 0.5}),  # Pythia
        # Soft-capping (Gemma 2), q/k norms (Gemma 3), local and global layers: their window spans the
        # whole context, which is what a prefix needs (a shorter one is refused at load).
        "gemma2": (Gemma2Config, Gemma2ForCausalLM, {**gqa, "sliding_window": 512, "query_pre_attn_scalar": hidden // 2}),
        "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {**gqa, "sliding_window": 512,
                                                         "query_pre_attn_scalar": hidden // 2}),
        "opt": (OPTConfig, OPTForCausalLM, {"ffn_dim": 2 * hidden, "word_embed_proj_dim": hidden}),
    }


TINY_FAMILIES = ("gpt2", *_decoders(64), "t5", "bart")


def _config(family: str, hidden: int, layers: int):
    common = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
                  initializer_range=INIT_RANGE)
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common), GPT2LMHeadModel
    decoders = _decoders(hidden)
    if family in decoders:
        config_class, model_class, extra = decoders[family]
        return config_class(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            max_position_embeddings=512, tie_word_embeddings=False, **extra, **common,
        ), model_class
    if family == "t5":
        return T5Config(
            d_model=hidden, d_kv=hidden // 4, d_ff=2 * hidden, num_layers=layers, num_decoder_layers=layers,
            num_heads=4, feed_forward_proj="relu", decoder_start_token_id=PAD_ID, **common,
        ), T5ForConditionalGeneration
    # Learned absolute positions on both sides; the decoder starts from </s>. BART draws every weight
    # with init_std as is (T5 scales its by width), so half the range keeps it from saturating.
    if family == "bart":
        return BartConfig(
            d_model=hidden, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden,
            max_position_embeddings=512, decoder_start_token_id=EOS_ID, forced_bos_token_id=None,
            forced_eos_token_id=None, init_std=common.pop("initializer_range") / 2, **common,
        ), BartForConditionalGeneration
    raise WorkerError(f"unknown family {family!r}; expected one of {', '.join(TINY_FAMILIES)}")


def build_backbone(out_dir: str | Path, family: str = "gpt2", *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write a small random-init `family` model and its tokenizer to `out_dir`."""
    config, model_class = _config(family, hidden, layers)
    torch.manual_seed(seed)
    model = model_class(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out
