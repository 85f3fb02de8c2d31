"""One forward pass of the frozen backbone where each row reads its own prefix (or none)."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.data import IGNORE, Batch
from prefixfleet.workers.prefix import PrefixTensors
from prefixfleet.workers.wiring import PrefixedCall, prefixed_call


def _call(backbone: Backbone, batch: Batch, rows: PrefixTensors | None) -> PrefixedCall:
    return prefixed_call(backbone, rows, batch.input_ids, batch.attention_mask,
                         batch.decoder_input_ids, batch.decoder_attention_mask)


def logits(backbone: Backbone, batch: Batch, rows: PrefixTensors | None) -> torch.Tensor:
    """Logits aligned with `batch.labels`'s positions: `[B, T, V]` (prefix positions removed)."""
    call = _call(backbone, batch, rows)
    return call(backbone.model, use_cache=False).logits[:, call.prompt_length:]


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
    call = _call(backbone, batch, rows)
    hidden = call(backbone.model.base_model, use_cache=False).last_hidden_state[:, call.prompt_length:]
    targets = labels[:, 1:]  # next-token prediction
    scored = batch.scored if batch.scored is not None else (targets != IGNORE).nonzero()
    row, position = scored[:, 0], scored[:, 1]  # index tensors, not a mask: nothing waits for the device
    scores = backbone.model.get_output_embeddings()(hidden[row, position]).float()
    token = F.cross_entropy(scores, targets[row, position], reduction="none")
    return token.new_zeros(labels.shape[0]).index_add(0, row, token), (targets != IGNORE).sum(dim=1)
