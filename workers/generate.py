"""Generation where each row of the batch carries its own user's prefix, through transformers'
own `generate`: the prefix enters as a pre-filled cache (deep methods) or as input embeddings
(prompt tuning); left padding, masks over prefix + prompt and positions come out right for
every row, so a row's greedy output equals generating for that user alone."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.data import pad_rows
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.prefix import PrefixTensors, stack_rows
from prefixfleet.workers.wiring import prefixed_call


@torch.no_grad()
def generate_ids(
    backbone: Backbone,
    prefixes: Sequence[PrefixTensors | None],
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[list[int]]:
    """The new token ids continuing `prompts[i]` with `prefixes[i]` (None: the bare backbone), each
    row through its first end-of-sequence token. Rows must share a prefix layout (method and
    length); mixed layouts go in separate calls."""
    if len(prefixes) != len(prompts):
        raise WorkerError(f"{len(prefixes)} prefixes for {len(prompts)} prompts")
    if not prompts:
        return []
    if any(p is None for p in prefixes) and not all(p is None for p in prefixes):
        raise WorkerError("rows with and without a prefix cannot share one batch")
    if seed is not None:
        torch.manual_seed(seed)
    model, family, tok = backbone.model, backbone.family, backbone.tokenizer
    device = backbone.device
    if family.encoder_decoder:  # encoder input as in training: text + EOS, right-padded
        ids = [tok(p, add_special_tokens=False).input_ids + [tok.eos_token_id] for p in prompts]
        input_ids, mask = pad_rows(ids, tok.pad_token_id), pad_rows([[1] * len(r) for r in ids], 0)
    else:
        enc = tok(list(prompts), padding=True, return_tensors="pt", padding_side="left", add_special_tokens=False)
        input_ids, mask = enc.input_ids, enc.attention_mask
    if (mask.sum(1) == 0).any():
        raise WorkerError("a prompt tokenizes to nothing")
    input_ids, mask = input_ids.to(device), mask.to(device)
    # Finished rows are filled with end-of-sequence, not padding: every row is cut there anyway, and a
    # pad id fed back as input makes transformers warn of a missing attention mask.
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tok.eos_token_id)
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    rows = None if prefixes[0] is None else stack_rows(
        [{k: v.to(device) for k, v in p.items()} for p in prefixes], list(range(len(prefixes))))
    start = ones = None
    if family.encoder_decoder:
        start = torch.full((len(prompts), 1), backbone.config.decoder_start_token_id, device=device)
        ones = torch.ones_like(start)
    call = prefixed_call(backbone, rows, input_ids, mask, start, ones)
    out = call(model.generate, **options)
    if family.encoder_decoder:  # the decoder start token
        out = out[:, 1:]
    elif "input_ids" in call.kwargs:
        out = out[:, input_ids.shape[1]:]
    return [_through_eos(row, _eos_ids(model)) for row in out.tolist()]


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


def _through_eos(row: list[int], eos: set[int]) -> list[int]:
    """A row up to and including its first end-of-sequence token (what follows is padding)."""
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


def generate(backbone: Backbone, prefixes: Sequence[PrefixTensors | None], prompts: Sequence[str],
             **options: Any) -> list[str]:
    """`generate_ids` (same options), decoded: the text continuing each prompt."""
    return backbone.tokenizer.batch_decode(generate_ids(backbone, prefixes, prompts, **options), skip_special_tokens=True)
