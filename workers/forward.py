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


def logits(backbone: Backbone, batch: Batch, rows: PrefixTensors | None) -> torch.Tensor:
    """Logits aligned with `batch.labels`'s positions: `[B, T, V]` (prefix positions removed)."""
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
        encoder_rows = rows.get("encoder")
        if encoder_rows is not None:
            encoder_rows = encoder_rows.to(model.dtype)
    with encoder_prefix(encoder_rows):
        out = model(**kwargs).logits
    return out[:, prompt_length:]


def row_losses(backbone: Backbone, batch: Batch, rows: PrefixTensors | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed token cross-entropy `[B]` and per-row count of loss tokens `[B]`.

    Rows never mix: callers normalize per user, so no user's loss scale reaches another's.
    """
    scores = logits(backbone, batch, rows).float()
    labels = batch.labels
    if not backbone.family.encoder_decoder:  # next-token prediction
        scores, labels = scores[:, :-1], labels[:, 1:]
    token = F.cross_entropy(scores.reshape(-1, scores.shape[-1]), labels.reshape(-1),
                            ignore_index=IGNORE, reduction="none").view(labels.shape)
    return token.sum(dim=1), (labels != IGNORE).sum(dim=1)
