"""One user's examples: validation, a deterministic hold-out, tokenization with a stated
truncation policy, the data fingerprint, and right-padded batches."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.errors import BadExample

log = logging.getLogger(__name__)

IGNORE = -100

TRUNCATION_POLICY = (
    "an example longer than the limit keeps the end of its prompt and the start of its completion: "
    "prompt tokens are dropped from the left first, then completion tokens from the right; "
    "a text example keeps its first tokens"
)


@dataclass(frozen=True)
class Example:
    """`prompt` + `completion` (loss on the completion only) or `text` (loss on every token)."""

    prompt: str | None = None
    completion: str | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        pair = self.prompt is not None or self.completion is not None
        if pair == (self.text is not None):
            raise BadExample("an example has either `text` or `prompt` + `completion`")
        for name in ("prompt", "completion", "text"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise BadExample(f"field {name!r} must be a string, got {type(value).__name__}")
            if value is not None and not value.isascii():
                try:
                    value.encode()
                except UnicodeEncodeError as exc:
                    raise BadExample(f"field {name!r} is not valid Unicode (unpaired surrogate "
                                     f"U+{ord(value[exc.start]):04X} at character {exc.start + 1})") from None
        if pair and (self.prompt is None or not self.completion):
            raise BadExample("`completion` must be a non-empty string next to `prompt`")
        if self.text is not None and not self.text.strip():
            raise BadExample("`text` is empty")

    def canonical(self) -> str:
        return json.dumps([self.prompt, self.completion, self.text], ensure_ascii=False)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()


def canonical_order(examples: Sequence[Example]) -> list[Example]:
    """Examples sorted by content: the same data in any file order trains the same prefix."""
    return sorted(examples, key=lambda e: e.digest)


def data_fingerprint(examples: Sequence[Example]) -> str:
    """sha256 of a user's examples, independent of their order."""
    digest = hashlib.sha256()
    for example in canonical_order(examples):
        digest.update(example.digest.encode())
    return digest.hexdigest()


def holdout(examples: Sequence[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Deterministic per-user split by content hash; never depends on other users' data.

    With fewer than two examples there is nothing to hold out: eval falls back to the train set.
    """
    ordered = canonical_order(examples)
    if len(ordered) < 2 or fraction <= 0:
        return ordered, list(ordered)
    held = [int(e.digest[:8], 16) / 0xFFFFFFFF < fraction for e in ordered]
    if not any(held):
        held[-1] = True
    if all(held):
        held[0] = False
    return ([e for e, h in zip(ordered, held, strict=True) if not h],
            [e for e, h in zip(ordered, held, strict=True) if h])


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example. Decoder-only: `labels` align with `input_ids` (IGNORE where no
    loss). Encoder-decoder: `input_ids` feed the encoder, `labels` are the decoder's targets."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def token_budget(backbone: Backbone, max_length: int, num_virtual_tokens: int) -> int:
    """Tokens an example may use: the config's limit, within the context the prefix leaves."""
    context = backbone.max_positions
    if context is None:
        return max_length
    return max(2, min(max_length, context - num_virtual_tokens))


def encode(backbone: Backbone, examples: Sequence[Example], *, user: str, limit: int) -> list[Encoded]:
    """Tokenize a user's examples; empty or over-long ones are named by user and example index."""
    tok = backbone.tokenizer
    eos = [tok.eos_token_id]
    encoded = []
    for index, example in enumerate(examples):
        where = f"user {user!r}, example {index}"
        if example.text is not None:
            source, target = [], tok(example.text, add_special_tokens=False).input_ids
        else:
            source = tok(example.prompt, add_special_tokens=False).input_ids
            target = tok(example.completion, add_special_tokens=False).input_ids
        if not target:
            raise BadExample(f"{where}: the text tokenizes to nothing")
        target = target + eos
        if backbone.family.encoder_decoder:
            truncated = len(source) + 1 > limit or len(target) > limit
            item = Encoded(tuple(source[max(0, len(source) - (limit - 1)):] + eos), tuple(target[:limit]))
        else:
            keep_source = max(0, min(len(source), limit - min(len(target), limit)))
            truncated = keep_source < len(source) or len(target) > limit - keep_source
            source = source[len(source) - keep_source:]
            target = target[: limit - len(source)]
            item = Encoded(tuple(source + target), tuple([IGNORE] * len(source) + target))
        if truncated:
            log.warning("%s: longer than %d tokens, truncated (%s)", where, limit, TRUNCATION_POLICY)
        encoded.append(item)
    return encoded


@dataclass
class Batch:
    """Right-padded rows. Encoder-decoder rows also carry the decoder's inputs."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    decoder_input_ids: torch.Tensor | None = None
    decoder_attention_mask: torch.Tensor | None = None
    scored: torch.Tensor | None = None  # [N, 2] (row, position) of each next-token label, found on the host

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate(backbone: Backbone, items: Sequence[Encoded], device: torch.device | None = None) -> Batch:
    pad = backbone.tokenizer.pad_token_id
    input_ids = pad_rows([i.input_ids for i in items], pad)
    mask = pad_rows([[1] * len(i.input_ids) for i in items], 0)
    labels = pad_rows([i.labels for i in items], IGNORE)
    batch = Batch(input_ids, mask, labels)
    if not backbone.family.encoder_decoder:
        batch.scored = (labels[:, 1:] != IGNORE).nonzero()
    else:
        start = backbone.config.decoder_start_token_id
        batch.decoder_input_ids = pad_rows([(start, *i.labels[:-1]) for i in items], pad)
        batch.decoder_attention_mask = pad_rows([[1] * len(i.labels) for i in items], 0)
    if device is not None:
        for name, value in vars(batch).items():
            if value is not None:
                setattr(batch, name, to_device(value, device))
    return batch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; to a GPU through pinned memory, so the host does not wait for the copy."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
