"""Choosing each row's next token with that row's own settings and random generator: a sampled
row draws only from its own generator, so its output is the same whoever shares its batch."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefixfleet.workers.errors import WorkerError


@dataclass(frozen=True)
class Sampling:
    """Greedy unless `do_sample`; then temperature, top-k (0: off) and top-p, in that order, as
    transformers' `generate` applies them."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.temperature < math.inf or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise WorkerError("sampling needs a finite temperature > 0, top_k ≥ 0 and 0 < top_p ≤ 1")


def row_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A row's own generator: seeded when asked, else from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def next_tokens(logits: torch.Tensor, settings: Sequence[Sampling],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `logits` [B, V]; a greedy row needs no generator."""
    tokens = logits.argmax(dim=-1)
    for row, (how, generator) in enumerate(zip(settings, generators, strict=True)):
        if how.do_sample:
            tokens[row] = _draw(logits[row], how, generator)
    return tokens


def _draw(scores: torch.Tensor, how: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    scores = scores.float()
    # Shifted before scaling (softmax does not mind) and divided by at least float32's smallest
    # normal: however tiny the temperature, nothing overflows to inf and the top token keeps 0.
    scores = (scores - scores.max()) / max(how.temperature, torch.finfo(torch.float32).tiny)
    if 0 < how.top_k < scores.numel():
        kth = torch.topk(scores, how.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if how.top_p < 1:
        ordered, order = torch.sort(scores)  # ascending, as transformers' TopPLogitsWarper
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - how.top_p
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[0]
