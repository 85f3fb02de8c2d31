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
class Family:
    """One row of the table."""

    name: str
    model_types: tuple[str, ...]
    encoder_decoder: bool
    stacks: Callable[[PretrainedConfig], dict[str, StackGeometry]]


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


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), False, _gpt2),
    Family("llama", ("llama", "mistral", "qwen2", "qwen3"), False, _decoder),
    Family("mixtral", ("mixtral",), False, _decoder),
    Family("phi3", ("phi3",), False, _decoder),
    Family("gpt-neox", ("gpt_neox",), False, _decoder),
    Family("opt", ("opt",), False, _decoder),
    Family("gemma", ("gemma2", "gemma3_text"), False, _decoder),
    Family("t5", ("t5", "mt5"), True, _t5),
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


def _encoder_self_attentions(model: nn.Module) -> list[nn.Module]:
    return [block.layer[0].SelfAttention for block in model.get_encoder().block]


def _t5_encoder_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    rows = _ENCODER_ROWS.get()
    if rows is None:
        return None
    keys, values = rows[:, module.layer_idx, 0], rows[:, module.layer_idx, 1]
    kwargs["cache"] = _EncoderPrefix(keys, values)
    mask = kwargs.get("mask")
    if mask is not None:  # additive float mask or boolean "may attend" mask: the prefix is visible
        visible = True if mask.dtype == torch.bool else 0.0
        kwargs["mask"] = nn.functional.pad(mask, (keys.shape[-2], 0), value=visible)
    return args, kwargs


def install_encoder_hooks(family: Family, model: nn.Module) -> None:
    """Let the encoder's self-attention read a prefix ([PREFIX; x] at every encoder layer).

    The hooks do nothing unless `encoder_prefix(rows)` is active. PEFT never reaches a T5 encoder
    (its issue #1188); here both sides get their own prefix.
    """
    if family.encoder_decoder:
        for attention in _encoder_self_attentions(model):
            attention.register_forward_pre_hook(_t5_encoder_pre_hook, with_kwargs=True)


@contextlib.contextmanager
def encoder_prefix(rows: torch.Tensor | None) -> Iterator[None]:
    """Within this block the encoder's self-attention prepends `rows` ([B, L, 2, H, P, D])."""
    token = _ENCODER_ROWS.set(rows)
    try:
        yield
    finally:
        _ENCODER_ROWS.reset(token)


# ---- activations of real tokens (init from text) -----------------------------------------------


@torch.no_grad()
def text_activations(family: Family, model: nn.Module, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer keys/values the frozen model computes for `token_ids` ([P]), per stack.

    Returns `{stack: [L, 2, H, P, D]}` — what a prefix initialized from real words starts at.
    """
    ids = token_ids.unsqueeze(0)
    out: dict[str, torch.Tensor] = {}
    if family.encoder_decoder:
        captured: dict[tuple[int, str], torch.Tensor] = {}
        handles = []
        for attention in _encoder_self_attentions(model):
            for name in ("k", "v"):
                def grab(mod, inp, output, key=(attention.layer_idx, name), heads=attention.n_heads):
                    captured[key] = output.view(1, output.shape[1], heads, -1).transpose(1, 2)
                handles.append(getattr(attention, name).register_forward_hook(grab))
        try:
            result = model(input_ids=ids, decoder_input_ids=ids, use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        layers = len(_encoder_self_attentions(model))
        out["encoder"] = torch.stack(
            [torch.stack([captured[(i, "k")][0], captured[(i, "v")][0]]) for i in range(layers)]
        )
        cache = result.cache.self_attention_cache
    else:
        cache = model(input_ids=ids, use_cache=True).cache
    out["decoder"] = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    return out
