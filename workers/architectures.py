"""The one table of architecture specifics: geometry of each attention stack, how a prefix is
handed to the model (cache object, encoder hooks), and how real-token activations are read.

Everything family-specific lives here; the rest of workers/ asks this table.
Prefix tensors use one layout everywhere: a stack's prefix is `[L, 2, kv_heads, P, head_dim]`
(layer, key/value, ...), with a leading batch dimension `[B, L, 2, kv_heads, P, head_dim]`
when rows of one batch carry different users' prefixes.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, PretrainedConfig

from prefixfleet.workers.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class StackGeometry:
    """Shape of one attention stack's key/value prefix."""

    layers: int
    kv_heads: int
    head_dim: int

    def shape(self, num_virtual_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.layers, 2, self.kv_heads, num_virtual_tokens, self.head_dim)

    def numel(self, num_virtual_tokens: int) -> int:
        return self.layers * 2 * self.kv_heads * num_virtual_tokens * self.head_dim


@dataclass(frozen=True)
class EncoderSide:
    """Where an encoder-decoder keeps what a prefix touches, and what it calls it."""

    self_attentions: Callable[[nn.Module], list[nn.Module]]  # the encoder's, in layer order
    mask_keyword: str  # the keyword its self-attention mask arrives under
    projections: tuple[str, str]  # its key and value projections
    heads: str  # the attribute holding its head count
    # The decoder's learned absolute positions, when it has them: they count from the cache's
    # length, so rows that share a decode step get theirs one by one (`decoder_positions`).
    decoder_positions: Callable[[nn.Module], nn.Module] | None = None


@dataclass(frozen=True)
class Family:
    """One row of the table."""

    name: str
    model_types: tuple[str, ...]
    stacks: Callable[[PretrainedConfig], dict[str, StackGeometry]]
    encoder: EncoderSide | None = None

    @property
    def encoder_decoder(self) -> bool:
        return self.encoder is not None


def _gpt2(c: PretrainedConfig) -> dict[str, StackGeometry]:
    return {"decoder": StackGeometry(c.n_layer, c.n_head, c.n_embd // c.n_head)}


def _decoder(c: PretrainedConfig) -> dict[str, StackGeometry]:
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return {"decoder": StackGeometry(c.num_hidden_layers, kv_heads, head_dim)}


def _t5(c: PretrainedConfig) -> dict[str, StackGeometry]:
    return {
        "encoder": StackGeometry(c.num_layers, c.num_heads, c.d_kv),
        "decoder": StackGeometry(c.num_decoder_layers or c.num_layers, c.num_heads, c.d_kv),
    }


def _bart(c: PretrainedConfig) -> dict[str, StackGeometry]:
    return {
        "encoder": StackGeometry(c.encoder_layers, c.encoder_attention_heads, c.d_model // c.encoder_attention_heads),
        "decoder": StackGeometry(c.decoder_layers, c.decoder_attention_heads, c.d_model // c.decoder_attention_heads),
    }


T5_ENCODER = EncoderSide(lambda model: [block.layer[0].SelfAttention for block in model.get_encoder().block],
                         mask_keyword="mask", projections=("k", "v"), heads="n_heads")
BART_ENCODER = EncoderSide(lambda model: [layer.self_attn for layer in model.get_encoder().layers],
                           mask_keyword="attention_mask", projections=("k_proj", "v_proj"), heads="num_heads",
                           decoder_positions=lambda model: model.get_decoder().embed_positions)

FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), _gpt2),
    Family("llama", ("llama", "mistral", "qwen2", "qwen3"), _decoder),
    Family("mixtral", ("mixtral",), _decoder),
    Family("phi3", ("phi3",), _decoder),
    Family("gpt-neox", ("gpt_neox",), _decoder),
    Family("opt", ("opt",), _decoder),
    Family("gemma", ("gemma2", "gemma3_text"), _decoder),
    Family("t5", ("t5", "mt5"), _t5, T5_ENCODER),
    Family("bart", ("bart",), _bart, BART_ENCODER),
)


def family_for(config: PretrainedConfig) -> Family:
    """The table row for a config, or an error naming the supported families (or the setting
    that makes a supported one unusable)."""
    for family in FAMILIES:
        if config.model_type in family.model_types:
            _refuse_sliding_window(config)
            return family
    supported = "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)
    raise UnsupportedArchitecture(
        f"model_type {config.model_type!r} is not supported; supported families: {supported}"
    )


def _refuse_sliding_window(config: PretrainedConfig) -> None:
    """Refuse a sliding attention window shorter than the model's context.

    Under a window a prefix is seen only by positions within the window of it, so it fades as a
    sequence grows; and in a mixed batch each row's left padding moves its prompt further from its
    prefix, so a row would no longer equal its user alone. Mistral's, Mixtral's and Phi-3's
    `sliding_window`, Qwen2/3's `use_sliding_window` and Gemma 2/3's local layers are refused here,
    once, at load.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None
    if window is not None and window < getattr(config, "max_position_embeddings", window + 1):
        raise UnsupportedArchitecture(
            f"model_type {config.model_type!r} has sliding_window={window} (shorter than its "
            f"{config.max_position_embeddings}-token context): a prefix under a sliding window fades and mixed "
            "batches would differ from each user alone; load it with sliding_window=None "
            "(use_sliding_window=false for Qwen2/3)"
        )


# ---- handing a prefix to the model -------------------------------------------------------------


def layer_pairs(rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`[B, L, 2, H, P, D]` → per layer (keys, values), each `[B, H, P, D]`."""
    return [(rows[:, layer, 0], rows[:, layer, 1]) for layer in range(rows.shape[1])]


def prefix_cache(family: Family, decoder_rows: torch.Tensor) -> DynamicCache | EncoderDecoderCache:
    """A fresh cache pre-filled with the decoder prefix: the model sees it as P earlier tokens.

    Fresh on every call: caches grow in place during generation.
    """
    self_attention = DynamicCache(ddp_cache_data=layer_pairs(decoder_rows))
    if family.encoder_decoder:
        return EncoderDecoderCache(self_attention, DynamicCache())
    return self_attention


class _EncoderPrefix:
    """Duck-typed cache for one encoder forward: prepends a fixed prefix, stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys.shape[-2]

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        return torch.cat([self.keys, keys], dim=-2), torch.cat([self.values, values], dim=-2)


_ENCODER_ROWS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "prefixfleet_encoder_rows", default=None
)
_DECODER_POSITIONS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "prefixfleet_decoder_positions", default=None
)


def _encoder_pre_hook(side: EncoderSide, layer: int, module: nn.Module, args: tuple, kwargs: dict):
    rows = _ENCODER_ROWS.get()
    if rows is None:
        return None
    keys, values = rows[:, layer, 0], rows[:, layer, 1]
    kwargs["cache"] = _EncoderPrefix(keys, values)
    mask = kwargs.get(side.mask_keyword)
    if mask is not None:  # additive float mask or boolean "may attend" mask: the prefix is visible
        visible = True if mask.dtype == torch.bool else 0.0
        kwargs[side.mask_keyword] = nn.functional.pad(mask, (keys.shape[-2], 0), value=visible)
    return args, kwargs


def _positions_hook(module: nn.Module, args: tuple, output: torch.Tensor):
    positions = _DECODER_POSITIONS.get()
    if positions is None:
        return None
    steps = torch.arange(output.shape[-2], device=positions.device)
    return nn.functional.embedding(positions[:, None] + steps + module.offset, module.weight)


def install_encoder_hooks(family: Family, model: nn.Module) -> None:
    """Let the encoder's self-attention read a prefix ([PREFIX; x] at every encoder layer), and a
    decoder with learned positions take each row's own.

    The hooks do nothing unless `encoder_prefix(rows)` or `decoder_positions(...)` is active. PEFT
    never reaches an encoder (its issue #1188); here both sides get their own prefix.
    """
    side = family.encoder
    if side is None:
        return
    for layer, attention in enumerate(side.self_attentions(model)):
        attention.register_forward_pre_hook(functools.partial(_encoder_pre_hook, side, layer), with_kwargs=True)
    if side.decoder_positions is not None:
        side.decoder_positions(model).register_forward_hook(_positions_hook)


@contextlib.contextmanager
def encoder_prefix(rows: torch.Tensor | None) -> Iterator[None]:
    """Within this block the encoder's self-attention prepends `rows` ([B, L, 2, H, P, D])."""
    token = _ENCODER_ROWS.set(rows)
    try:
        yield
    finally:
        _ENCODER_ROWS.reset(token)


@contextlib.contextmanager
def decoder_positions(first: torch.Tensor) -> Iterator[None]:
    """Within this block a decoder with learned positions numbers row r's tokens from `first[r]`
    on, as that row alone would count them (the cache's length), not from the shared cache width."""
    token = _DECODER_POSITIONS.set(first)
    try:
        yield
    finally:
        _DECODER_POSITIONS.reset(token)


# ---- activations of real tokens (init from text) -----------------------------------------------


@torch.no_grad()
def text_activations(family: Family, model: nn.Module, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer keys/values the frozen model computes for `token_ids` ([P]), per stack.

    Returns `{stack: [L, 2, H, P, D]}` — what a prefix initialized from real words starts at.
    """
    ids = token_ids.unsqueeze(0)
    out: dict[str, torch.Tensor] = {}
    if family.encoder is not None:
        attentions = family.encoder.self_attentions(model)
        captured: dict[tuple[int, int], torch.Tensor] = {}
        handles = []
        for layer, attention in enumerate(attentions):
            heads = getattr(attention, family.encoder.heads)
            for kind, name in enumerate(family.encoder.projections):
                def grab(mod, inp, output, key=(layer, kind), heads=heads):
                    captured[key] = output.view(1, output.shape[1], heads, -1).transpose(1, 2)
                handles.append(getattr(attention, name).register_forward_hook(grab))
        try:
            result = model(input_ids=ids, decoder_input_ids=ids, use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        out["encoder"] = torch.stack(
            [torch.stack([captured[(i, 0)][0], captured[(i, 1)][0]]) for i in range(len(attentions))]
        )
        cache = result.cache.self_attention_cache
    else:
        cache = model(input_ids=ids, use_cache=True).cache
    out["decoder"] = _stacked(cache)
    return out


def prompt_activations(model: nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    """Per-layer keys/values a decoder-only model computes for a soft prompt ([P, hidden] input
    embeddings at positions 0..P-1): `[L, 2, H, P, D]`, the deep prefix that puts the very same P
    positions before any input (the model is causal: nothing after them changes them)."""
    return _stacked(model(inputs_embeds=prompt.unsqueeze(0), use_cache=True).cache)


def _stacked(cache: DynamicCache) -> torch.Tensor:
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
