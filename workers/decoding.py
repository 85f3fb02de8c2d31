"""Iteration-level decoding over the frozen backbone: rows of different users, methods and prefix
lengths in one batched KV cache, joining and leaving at any step.

A row enters by `prefill` — alone, through the same prefix wiring and the same call that
`generate.py` makes for one row, so its cache and first logits are those of generating for that
user alone. After prefill a row is only a key/value cache (its prefix, its prompt, its tokens so
far), whatever its method: every row then shares every `decode_step`. Rows are kept left-padded to
one length; the attention mask hides the padding, and each decoder-only row carries its own
position ids, so a row's logits never depend on who shares its step. Encoder-decoder rows also
carry their encoder states, right-padded, with their mask.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.prefix import PrefixTensors, stack_rows
from prefixfleet.workers.wiring import prefixed_call


@dataclass
class Rows:
    """The running rows. `mask` [B, T]: 1 where a cached self-attention key is real; `positions` [B]:
    each decoder-only row's next position id; `encoder_states` [B, S, hidden] and `encoder_mask`
    [B, S] for encoder-decoder models."""

    cache: DynamicCache | EncoderDecoderCache
    mask: torch.Tensor
    positions: torch.Tensor
    encoder_states: torch.Tensor | None = None
    encoder_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        """Cached positions per row, padding included: the cache holds len(self) × length tokens."""
        return self.mask.shape[1]


def prompt_ids(backbone: Backbone, prompt: str) -> list[int]:
    """A prompt's token ids as the model reads them (encoder-decoder: text + EOS, as in training)."""
    tok = backbone.tokenizer
    ids = tok(prompt, add_special_tokens=False).input_ids
    if not ids:
        raise WorkerError("the prompt tokenizes to nothing")
    return ids + [tok.eos_token_id] if backbone.family.encoder_decoder else ids


@torch.no_grad()
def prefill(backbone: Backbone, prefix: PrefixTensors | None, ids: Sequence[int]) -> tuple[Rows, torch.Tensor]:
    """One new row: its cache after reading `ids` with `prefix` (None: the bare backbone), and the
    logits of its first new token `[1, V]`."""
    model, device = backbone.model, backbone.device
    input_ids = torch.tensor([list(ids)], device=device)
    mask = torch.ones_like(input_ids)
    rows = None if prefix is None else stack_rows([{k: v.to(device) for k, v in prefix.items()}], [0])
    if backbone.family.encoder_decoder:
        start = torch.full((1, 1), backbone.config.decoder_start_token_id, device=device)
        call = prefixed_call(backbone, rows, input_ids, mask, start, torch.ones_like(start))
        out = call(model, use_cache=True, return_dict=True)
        state = Rows(out.cache, call.kwargs["decoder_attention_mask"], torch.zeros(1, dtype=torch.long, device=device),
                     out.encoder_last_hidden_state, call.kwargs["attention_mask"])
        return state, out.logits[:, -1].float()
    call = prefixed_call(backbone, rows, input_ids, mask)
    full_mask = call.kwargs["attention_mask"]
    fed = call.kwargs["inputs_embeds" if "inputs_embeds" in call.kwargs else "input_ids"].shape[1]
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)[:, -fed:]
    if "cache" not in call.kwargs:
        call.kwargs["cache"] = DynamicCache()
    out = call(model, position_ids=positions, use_cache=True, logits_to_keep=1)
    return Rows(out.cache, full_mask, positions[:, -1] + 1), out.logits[:, -1].float()


@torch.no_grad()
def decode_step(backbone: Backbone, rows: Rows, tokens: torch.Tensor) -> torch.Tensor:
    """Append one token per row (`tokens` [B]); the logits of each row's next token `[B, V]`."""
    model = backbone.model
    rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows), 1)], dim=1)
    step = tokens.view(-1, 1).to(backbone.device)
    if backbone.family.encoder_decoder:
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=rows.encoder_states),
                    attention_mask=rows.encoder_mask, decoder_input_ids=step, decoder_attention_mask=rows.mask,
                    cache=rows.cache, use_cache=True)
    else:
        out = model(input_ids=step, attention_mask=rows.mask, position_ids=rows.positions.view(-1, 1),
                    cache=rows.cache, use_cache=True)
        rows.positions = rows.positions + 1
    rows.cache = out.cache
    return out.logits[:, -1].float()


def keep(rows: Rows, index: Sequence[int]) -> Rows | None:
    """The rows at `index` (in that order), with columns that are padding in every kept row cut
    away; None when no row is kept."""
    if not index:
        return None
    at = torch.as_tensor(list(index), device=rows.mask.device)
    mask = rows.mask[at]
    first = int((mask.cumsum(1) == 0).all(0).sum())  # leading columns that are padding everywhere
    _map_self(rows.cache, lambda t: t[at][:, :, first:])
    cross = None if rows.encoder_mask is None else rows.encoder_mask[at]
    width = None if cross is None else int(cross.any(0).nonzero().max()) + 1
    if cross is not None:
        _map_cross(rows.cache, lambda t: t[at][:, :, :width])
    return Rows(rows.cache, mask[:, first:], rows.positions[at],
                None if cross is None else rows.encoder_states[at][:, :width], None if cross is None else cross[:, :width])


def join(a: Rows | None, b: Rows) -> Rows:
    """`a`'s rows then `b`'s in one batch: self-attention left-padded, encoder states right-padded."""
    if a is None:
        return b
    length = max(a.length, b.length)
    _zip_self(a.cache, b.cache, lambda x, y: torch.cat([_pad_left(x, length), _pad_left(y, length)]))
    mask = torch.cat([_pad_left(a.mask, length), _pad_left(b.mask, length)])
    states = encoder_mask = None
    if a.encoder_mask is not None:
        width = max(a.encoder_mask.shape[1], b.encoder_mask.shape[1])
        _zip_cross(a.cache, b.cache, lambda x, y: torch.cat([_pad_right(x, width, -2), _pad_right(y, width, -2)]))
        states = torch.cat([_pad_right(a.encoder_states, width, 1), _pad_right(b.encoder_states, width, 1)])
        encoder_mask = torch.cat([_pad_right(a.encoder_mask, width, 1), _pad_right(b.encoder_mask, width, 1)])
    return Rows(a.cache, mask, torch.cat([a.positions, b.positions]), states, encoder_mask)


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros in front along the sequence dimension (-2 for keys/values, -1 for a mask)."""
    dim = -1 if t.dim() == 2 else -2
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    return F.pad(t, (missing, 0) if dim == -1 else (0, 0, missing, 0))


def _pad_right(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - (dim % t.dim()) - 1) + [0, missing]
    return F.pad(t, pad)


def _self_layers(cache: DynamicCache | EncoderDecoderCache):
    return (cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache).layers


def _map_self(cache, fn) -> None:
    for layer in _self_layers(cache):
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)


def _map_cross(cache: EncoderDecoderCache, fn) -> None:
    for layer in cache.cross_attention_cache.layers:
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)


def _zip_self(a, b, fn) -> None:
    for x, y in zip(_self_layers(a), _self_layers(b), strict=True):
        x.keys, x.values = fn(x.keys, y.keys), fn(x.values, y.values)


def _zip_cross(a: EncoderDecoderCache, b: EncoderDecoderCache, fn) -> None:
    for x, y in zip(a.cross_attention_cache.layers, b.cross_attention_cache.layers, strict=True):
        x.keys, x.values = fn(x.keys, y.keys), fn(x.values, y.values)
