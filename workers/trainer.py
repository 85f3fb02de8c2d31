"""Training prefixes against the frozen backbone: one user alone, or many users packed in one
batch with no coupling between them.

Packing is continuous batching: up to `pack_size` users share every forward/backward; each row
reads its own user's prefix. Per user: its own loss normalization, gradient clipping, AdamW state,
learning-rate schedule and step count. A user that finishes (or fails) leaves the pack and the
next one joins, so short users never wait for long ones. Training alone is a pack of one — the
same code path — which is what makes "packed equals alone" provable.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.data import Encoded, Example, collate, encode, holdout, token_budget
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.forward import row_losses
from prefixfleet.workers.prefix import PrefixTensors, UserPrefix, check_shapes, expected_shapes, stack_rows
from prefixfleet.workers.spec import PrefixSpec, TrainConfig

log = logging.getLogger(__name__)


@dataclass
class UserRequest:
    """One user's training request. Without `eval_examples` a per-user hold-out is taken."""

    user: str
    examples: Sequence[Example]
    spec: PrefixSpec = field(default_factory=PrefixSpec)
    config: TrainConfig = field(default_factory=TrainConfig)
    eval_examples: Sequence[Example] | None = None
    start: PrefixTensors | None = None  # warm start from an earlier prefix


@dataclass
class UserResult:
    user: str
    tensors: PrefixTensors | None = None
    eval_loss: float | None = None
    baseline_eval_loss: float | None = None
    loss_curve: list[float] = field(default_factory=list)
    steps: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def metrics(self) -> dict[str, float]:
        return {
            "eval_loss": float(self.eval_loss), "baseline_eval_loss": float(self.baseline_eval_loss),
            "final_train_loss": float(self.loss_curve[-1]), "steps": float(self.steps),
            "train_examples": float(self.train_examples), "eval_examples": float(self.eval_examples),
        }


def user_seed(seed: int, user: str) -> int:
    """A user's own seed: the same whoever else shares its pack."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{user}".encode()).digest()[:8], "big") >> 1


class _Slot:
    """A user inside the pack: parameters, optimizer, schedule and minibatch order."""

    def __init__(self, backbone: Backbone, request: UserRequest, train: list[Encoded], evals: list[Encoded]) -> None:
        self.request, self.train, self.evals = request, train, evals
        self.generator = torch.Generator().manual_seed(user_seed(request.config.seed, request.user))
        self.module = UserPrefix(backbone, request.spec, self.generator, request.start).to(backbone.device)
        cfg = request.config
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=cfg.learning_rate(request.spec.method),
                                           weight_decay=cfg.weight_decay, foreach=True)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _linear_schedule(cfg.warmup_steps, cfg.steps))
        self.step, self.curve, self.order = 0, [], []

    def next_batch(self) -> list[Encoded]:
        if not self.order:
            self.order = torch.randperm(len(self.train), generator=self.generator).tolist()
        take, self.order = self.order[: self.request.config.batch_size], self.order[self.request.config.batch_size:]
        self.batch_ids = take
        return [self.train[i] for i in take]

    def apply(self, loss: torch.Tensor) -> str | None:
        """One optimizer step for this user alone; a reason string if the user must stop."""
        value = loss.item()
        finite = math.isfinite(value)
        norm = nn.utils.clip_grad_norm_(self.module.parameters(), self.request.config.max_grad_norm) if finite else None
        if norm is None or not math.isfinite(norm):
            return (f"user {self.request.user!r}: non-finite loss or gradient at step {self.step} "
                    f"on training examples {sorted(self.batch_ids)}")
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.curve.append(value)
        return None


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def prepare(backbone: Backbone, request: UserRequest) -> tuple[list[Encoded], list[Encoded]]:
    """Validate and tokenize a request; errors name the user and the example."""
    if not request.examples:
        raise WorkerError(f"user {request.user!r}: no training examples")
    if request.eval_examples:
        train, evals = list(request.examples), list(request.eval_examples)
    else:
        train, evals = holdout(request.examples, request.config.eval_fraction)
    if request.start is not None:
        try:
            check_shapes(request.start, expected_shapes(backbone, request.spec))
        except WorkerError as exc:
            raise WorkerError(f"user {request.user!r}: warm start does not fit: {exc}") from exc
    limit = token_budget(backbone, request.config.max_length, request.spec.num_virtual_tokens)
    return encode(backbone, train, user=request.user, limit=limit), encode(backbone, evals, user=request.user, limit=limit)


@torch.no_grad()
def evaluate(backbone: Backbone, items: Sequence[tuple[PrefixTensors | None, Sequence[Encoded]]],
             rows_per_batch: int = 64) -> list[float]:
    """Token-mean eval loss per entry; entries share batches, each row with its own prefix."""
    flat = [(owner, item) for owner, (_, evals) in enumerate(items) for item in evals]
    sums = torch.zeros(len(items), dtype=torch.float64)
    counts = torch.zeros(len(items), dtype=torch.float64)
    with_prefix = items[0][0] is not None
    for start in range(0, len(flat), rows_per_batch):
        chunk = flat[start:start + rows_per_batch]
        owners = [owner for owner, _ in chunk]
        batch = collate(backbone, [item for _, item in chunk], backbone.device)
        rows = None
        if with_prefix:
            present = sorted(set(owners))
            local = {o: i for i, o in enumerate(present)}
            rows = stack_rows([items[o][0] for o in present], [local[o] for o in owners])
        loss, count = row_losses(backbone, batch, rows)
        sums.index_add_(0, torch.tensor(owners), loss.double().cpu())
        counts.index_add_(0, torch.tensor(owners), count.double().cpu())
    return (sums / counts.clamp(min=1)).tolist()


def train_users(backbone: Backbone, requests: Sequence[UserRequest], *, pack_size: int = 8,
                on_result: Callable[[int, UserResult], None] | None = None) -> list[UserResult]:
    """Train every request; one result per request, in order. Failures stay with their user."""
    results: dict[int, UserResult] = {}

    def finish(index: int, result: UserResult) -> None:
        results[index] = result
        if on_result is not None:
            on_result(index, result)

    groups: dict[tuple[str, int], deque[tuple[int, list[Encoded], list[Encoded]]]] = {}
    for index, request in enumerate(requests):
        try:
            train, evals = prepare(backbone, request)
        except WorkerError as exc:
            finish(index, UserResult(request.user, error=str(exc)))
            continue
        key = (request.spec.method, request.spec.num_virtual_tokens)  # users of one pack share prefix shapes
        groups.setdefault(key, deque()).append((index, train, evals))
    for queue in groups.values():
        _train_group(backbone, requests, queue, max(1, pack_size), finish)
    return [results[i] for i in range(len(requests))]


def _train_group(backbone: Backbone, requests: Sequence[UserRequest], queue: deque, pack_size: int,
                 finish: Callable[[int, UserResult], None]) -> None:
    active: dict[int, _Slot] = {}
    while queue or active:
        while queue and len(active) < pack_size:
            index, train, evals = queue.popleft()
            active[index] = _Slot(backbone, requests[index], train, evals)
        indices = list(active)
        slots = [active[i] for i in indices]
        items, owners = [], []
        for position, slot in enumerate(slots):
            batch_items = slot.next_batch()
            items += batch_items
            owners += [position] * len(batch_items)
        tensors = [slot.module() for slot in slots]
        loss_sum, count = row_losses(backbone, collate(backbone, items, backbone.device), stack_rows(tensors, owners))
        owner_index = torch.tensor(owners, device=loss_sum.device)
        sums = loss_sum.new_zeros(len(slots)).index_add(0, owner_index, loss_sum)
        tokens = count.new_zeros(len(slots)).index_add(0, owner_index, count)
        per_user = sums / tokens  # each user's loss is normalized by its own tokens only
        finite = torch.isfinite(per_user)
        if finite.any():  # a non-finite user is left out whole: nothing of it reaches the others
            per_user[finite].sum().backward()
        for index, slot, loss in zip(indices, slots, per_user.detach(), strict=True):
            failure = slot.apply(loss)
            if failure is not None:
                log.warning("%s", failure)
                del active[index]
                finish(index, UserResult(slot.request.user, steps=slot.step, loss_curve=slot.curve, error=failure))
            elif slot.step >= slot.request.config.steps:
                del active[index]
                finish(index, _result(backbone, slot))


def _result(backbone: Backbone, slot: _Slot) -> UserResult:
    with torch.no_grad():
        tensors = {k: v.detach().float().cpu() for k, v in slot.module().items()}
    device_tensors = {k: v.to(backbone.device) for k, v in tensors.items()}
    eval_loss, = evaluate(backbone, [(device_tensors, slot.evals)])
    baseline, = evaluate(backbone, [(None, slot.evals)])
    return UserResult(
        user=slot.request.user, tensors=tensors, eval_loss=eval_loss, baseline_eval_loss=baseline,
        loss_curve=slot.curve, steps=slot.step, train_examples=len(slot.train), eval_examples=len(slot.evals),
    )


def train_user(backbone: Backbone, request: UserRequest) -> UserResult:
    """Train one user alone; raises WorkerError (naming the user and example) on bad input."""
    result, = train_users(backbone, [request], pack_size=1)
    if not result.ok:
        raise WorkerError(result.error)
    return result
