"""The one place a prefix is wired into the frozen model, for training, evaluation and generation.

"Serving a user equals training that user" rests on this: `forward.py` and `generate.py` both
build their model call here. Deep prefixes enter as a pre-filled cache (`cache=`, the keyword
transformers ≥ 5.24 reads; T5 ignores the older `past_key_values`) and, on an encoder-decoder
model, through the encoder hooks; prompt tuning enters as input embeddings. Masks gain one
visible column per prefix position.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prefixfleet.workers.architectures import encoder_prefix, prefix_cache
from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.prefix import PrefixTensors


def with_prefix_columns(mask: torch.Tensor, length: int) -> torch.Tensor:
    """The attention mask with `length` visible prefix positions in front."""
    return torch.cat([mask.new_ones(mask.shape[0], length), mask], dim=1)


@dataclass
class PrefixedCall:
    """Keyword arguments of one model call with each row's prefix in place.

    `prompt_length`: how many leading output positions belong to a soft prompt (decoder-only).
    """

    kwargs: dict[str, Any]
    encoder_rows: torch.Tensor | None
    prompt_length: int

    def __call__(self, fn: Callable[..., Any], **extra: Any) -> Any:
        """`fn(**kwargs, **extra)` with the encoder prefix active (the model, its base, `generate`)."""
        with encoder_prefix(self.encoder_rows):
            return fn(**self.kwargs, **extra)


def prefixed_call(backbone: Backbone, rows: PrefixTensors | None, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor | None = None,
                  decoder_attention_mask: torch.Tensor | None = None) -> PrefixedCall:
    """Wire `rows` (batched prefix tensors, row r for input row r; None: the bare backbone) into
    a call on `input_ids`. Encoder-decoder models also take the decoder's inputs."""
    model, family = backbone.model, backbone.family
    kwargs: dict[str, Any] = {"attention_mask": attention_mask}
    if family.encoder_decoder:
        kwargs.update(decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask)
    rows = {name: value.to(model.dtype) for name, value in rows.items()} if rows is not None else {}
    prompt_length = 0
    if "prompt" in rows:
        embeds = model.get_input_embeddings()(input_ids)
        kwargs["inputs_embeds"] = torch.cat([rows["prompt"], embeds], dim=1)
        kwargs["attention_mask"] = with_prefix_columns(attention_mask, rows["prompt"].shape[1])
        prompt_length = 0 if family.encoder_decoder else rows["prompt"].shape[1]
    else:
        kwargs["input_ids"] = input_ids
    if "decoder" in rows:
        kwargs["cache"] = prefix_cache(family, rows["decoder"])
        mask_key = "decoder_attention_mask" if family.encoder_decoder else "attention_mask"
        kwargs[mask_key] = with_prefix_columns(kwargs[mask_key], rows["decoder"].shape[-2])
    return PrefixedCall(kwargs, rows.get("encoder"), prompt_length)
