"""Iteration-level decoding over the frozen backbone: rows of different users, methods and prefix
lengths in one batched KV cache, joining and leaving at any step.

Rows enter by `prefill`, several of one prefix layout at once, through the same prefix wiring and
padded as `generate.py` pads a batch; then each row's cache is closed up (no padding between its
prefix and its prompt). After prefill a row is only a key/value cache (its prefix, its prompt, its
tokens so far), whatever its method: every row then shares every `decode_step`. Rows are kept left-padded to
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

from prefixfleet.workers.architectures import decoder_positions
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
def prefill(backbone: Backbone, prefixes: Sequence[PrefixTensors | None],
            ids: Sequence[Sequence[int]]) -> tuple[Rows, torch.Tensor]:
    """New rows: their caches after reading `ids[i]` with `prefixes[i]` (None: the bare backbone),
    and the logits of each row's first new token `[B, V]`. The rows must share a prefix layout;
    they are padded as `generate_ids` pads them, then each row's cache is closed up."""
    if len(prefixes) != len(ids) or not ids:
        raise WorkerError(f"{len(prefixes)} prefixes for {len(ids)} prompts")
    if any(p is None for p in prefixes) and not all(p is None for p in prefixes):
        raise WorkerError("rows with and without a prefix cannot share one prefill")
    model, device, pad = backbone.model, backbone.device, backbone.tokenizer.pad_token_id
    encoder_decoder = backbone.family.encoder_decoder
    width = max(map(len, ids))
    if encoder_decoder:  # right-padded encoder input, as in training
        padded = [(list(r) + [pad] * (width - len(r)), [1] * len(r) + [0] * (width - len(r))) for r in ids]
    else:  # left-padded, as `generate` wants a decoder-only batch
        padded = [([pad] * (width - len(r)) + list(r), [0] * (width - len(r)) + [1] * len(r)) for r in ids]
    input_ids = torch.tensor([tokens for tokens, _ in padded], device=device)
    mask = torch.tensor([visible for _, visible in padded], device=device)
    rows = None if prefixes[0] is None else stack_rows(
        [{k: v.to(device) for k, v in p.items()} for p in prefixes], list(range(len(prefixes))))
    if encoder_decoder:
        start = torch.full((len(ids), 1), backbone.config.decoder_start_token_id, device=device)
        call = prefixed_call(backbone, rows, input_ids, mask, start, torch.ones_like(start))
        out = call(model, use_cache=True, return_dict=True)
        state = Rows(out.cache, call.kwargs["decoder_attention_mask"],
                     torch.zeros(len(ids), dtype=torch.long, device=device),
                     out.encoder_last_hidden_state, call.kwargs["attention_mask"])
        return state, out.logits[:, -1].float()
    call = prefixed_call(backbone, rows, input_ids, mask)
    full_mask = call.kwargs["attention_mask"]
    fed = call.kwargs["inputs_embeds" if "inputs_embeds" in call.kwargs else "input_ids"].shape[1]
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)[:, -fed:]
    if "cache" not in call.kwargs:
        call.kwargs["cache"] = DynamicCache()
    out = call(model, position_ids=positions, use_cache=True, logits_to_keep=1)
    return _closed_up(Rows(out.cache, full_mask, positions[:, -1] + 1)), out.logits[:, -1].float()


def _closed_up(rows: Rows) -> Rows:
    """Each row's real cache columns moved together at the right, in order: the padding between a
    prefix and a shorter prompt goes, so a row holds no more positions than it uses. Attention
    reads keys by mask and position ids, not by column, so nothing a row computes changes."""
    lengths = rows.mask.sum(1)
    width = int(lengths.max())
    if bool((lengths == rows.length).all()):
        return rows
    # Column j of the new row r reads old column order[r, j - (width - lengths[r])]: the real
    # columns of r, in order; the columns to their left read column 0 and are masked.
    order = torch.sort((rows.mask == 0).long(), dim=1, stable=True).indices[:, :width]  # real columns first
    shift = (width - lengths).unsqueeze(1)
    slot = torch.arange(width, device=rows.mask.device).unsqueeze(0) - shift
    source = torch.where(slot >= 0, order.gather(1, slot.clamp(min=0)), torch.zeros_like(slot))
    mask = (slot >= 0).long()

    def gather(t: torch.Tensor) -> torch.Tensor:
        index = source[:, None, :, None].expand(t.shape[0], t.shape[1], width, t.shape[3])
        return t.gather(2, index) * mask[:, None, :, None].to(t.dtype)

    _map_self(rows.cache, gather)
    return Rows(rows.cache, mask, rows.positions)


@torch.no_grad()
def decode_step(backbone: Backbone, rows: Rows, tokens: torch.Tensor) -> torch.Tensor:
    """Append one token per row (`tokens` [B]); the logits of each row's next token `[B, V]`."""
    model = backbone.model
    rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows), 1)], dim=1)
    step = tokens.view(-1, 1).to(backbone.device)
    if backbone.family.encoder_decoder:
        # A row alone would count its decoder position from its own cache: its real columns so far.
        with decoder_positions(rows.mask.sum(1) - 1):
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
    if list(index) == list(range(len(rows))):
        return rows  # nobody left: nothing to cut either
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
