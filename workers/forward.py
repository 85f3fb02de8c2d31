"""One forward pass of the frozen backbone where each row reads its own prefix (or none)."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from workers.architectures import encoder_prefix, prefix_cache
from workers.backbone import Backbone
from workers.data import IGNORE, Batch
from workers.prefix import PrefixTensors


def _with_prefix_columns(mask: torch.Tensor, length: int) -> torch.Tensor:
    """The attention mask with `length` visible prefix positions in front."""
    return torch.cat([mask.new_ones(mask.shape[0], length), mask], dim=1)


def _model_inputs(backbone: Backbone, batch: Batch, rows: PrefixTensors | None) -> tuple[dict, torch.Tensor | None, int]:
    """Keyword arguments for the model, the encoder prefix rows, and how many leading output
    positions belong to a soft prompt."""
    model, family = backbone.model, backbone.family
    kwargs: dict = {"attention_mask": batch.attention_mask, "use_cache": False}
    if family.encoder_decoder:
        kwargs["decoder_input_ids"] = batch.decoder_input_ids
        kwargs["decoder_attention_mask"] = batch.decoder_attention_mask
    encoder_rows = None
    prompt_length = 0
    if rows is not None and "prompt" in rows:
        embeds = model.get_input_embeddings()(batch.input_ids)
        prompt = rows["prompt"].to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        kwargs["attention_mask"] = _with_prefix_columns(batch.attention_mask, prompt.shape[1])
        prompt_length = 0 if family.encoder_decoder else prompt.shape[1]
    else:
        kwargs["input_ids"] = batch.input_ids
    if rows is not None and "decoder" in rows:
        decoder = rows["decoder"].to(model.dtype)
        kwargs["past_key_values"] = prefix_cache(family, decoder)
        mask_key = "decoder_attention_mask" if family.encoder_decoder else "attention_mask"
        kwargs[mask_key] = _with_prefix_columns(kwargs[mask_key], decoder.shape[-2])
        if rows.get("encoder") is not None:
            encoder_rows = rows["encoder"].to(model.dtype)
    return kwargs, encoder_rows, prompt_length


def logits(backbone: Backbone, batch: Batch, rows: PrefixTensors | None) -> torch.Tensor:
    """Logits aligned with `batch.labels`'s positions: `[B, T, V]` (prefix positions removed)."""
    kwargs, encoder_rows, prompt_length = _model_inputs(backbone, batch, rows)
    with encoder_prefix(encoder_rows):
        out = backbone.model(**kwargs).logits
    return out[:, prompt_length:]


def row_losses(backbone: Backbone, batch: Batch, rows: PrefixTensors | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed token cross-entropy `[B]` and per-row count of loss tokens `[B]`.

    Rows never mix: callers normalize per user, so no user's loss scale reaches another's.
    Decoder-only models score only the positions that carry a label: the vocabulary projection,
    often the largest matmul of the model, is skipped for prompt and padding positions.
    """
    labels = batch.labels
    if backbone.family.encoder_decoder:
        scores = logits(backbone, batch, rows).float()
        token = F.cross_entropy(scores.reshape(-1, scores.shape[-1]), labels.reshape(-1),
                                ignore_index=IGNORE, reduction="none").view(labels.shape)
        return token.sum(dim=1), (labels != IGNORE).sum(dim=1)
    kwargs, _, prompt_length = _model_inputs(backbone, batch, rows)
    hidden = backbone.model.base_model(**kwargs).last_hidden_state[:, prompt_length:]
    targets = labels[:, 1:]  # next-token prediction
    keep = targets != IGNORE
    scores = backbone.model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    token = F.cross_entropy(scores, targets[keep], reduction="none")
    owner = keep.nonzero()[:, 0]
    return token.new_zeros(labels.shape[0]).index_add(0, owner, token), keep.sum(dim=1)
