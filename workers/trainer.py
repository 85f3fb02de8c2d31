"""Training prefixes against the frozen backbone: one user alone, or many users packed in one
batch with no coupling between them.

Packing is continuous batching: up to `pack_size` users share every forward/backward; each row
reads its own user's prefix. Per user: its own loss normalization, gradient clipping, AdamW state,
learning-rate schedule and step count — held for the whole pack as stacked tensors and `[slots]`
vectors (`workers/pack.py`), so a step costs the same few kernels for 1 user or 64 and never waits
for the host. A user that finishes (or fails) leaves the pack at the next sync and the next one
joins, so short users never wait for long ones. Training alone is a pack of one — the same code
path — which is what makes "packed equals alone" provable.
"""
from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.data import Encoded, Example, collate, encode, holdout, to_device, token_budget
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.forward import row_losses
from prefixfleet.workers.pack import PackedAdamW, PackedPrefixes
from prefixfleet.workers.prefix import PrefixTensors, UserPrefix, check_shapes, expected_shapes, init_tokens, stack_rows
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


SYNC_EVERY = 32  # steps a pack runs at most between syncs: when failures are read and slots refilled


class _Member:
    """A user inside the pack: its slot, minibatch order and what the host knows of its steps."""

    def __init__(self, index: int, request: UserRequest, train: list[Encoded], evals: list[Encoded]) -> None:
        self.index, self.request, self.train, self.evals = index, request, train, evals
        self.generator = torch.Generator().manual_seed(user_seed(request.config.seed, request.user))
        self.steps_run = 0  # steps this user's rows have been in, counted on the host
        self.curve: list[float] = []  # losses of the steps read back at the last sync
        self.order: list[int] = []
        self.batches: list[list[int]] = []  # example ids of each step since the last sync

    def next_batch(self) -> list[Encoded]:
        if not self.order:
            self.order = torch.randperm(len(self.train), generator=self.generator).tolist()
        size = self.request.config.batch_size
        take, self.order = self.order[:size], self.order[size:]
        self.batches.append(take)
        self.steps_run += 1
        return [self.train[i] for i in take]

    @property
    def done(self) -> bool:
        return self.steps_run >= self.request.config.steps


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
    elif request.spec.init_text is not None:
        try:
            init_tokens(backbone, request.spec.init_text, request.spec.num_virtual_tokens)
        except WorkerError as exc:
            raise WorkerError(f"user {request.user!r}: {exc}") from exc
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

    groups: dict[tuple, deque[_Member]] = {}
    for index, request in enumerate(requests):
        try:
            train, evals = prepare(backbone, request)
        except WorkerError as exc:
            finish(index, UserResult(request.user, error=str(exc)))
            continue
        spec = request.spec  # users of one pack share prefix shapes and precision
        key = (spec.method, spec.num_virtual_tokens, spec.reparam_hidden, request.config.precision)
        groups.setdefault(key, deque()).append(_Member(index, request, train, evals))
    for queue in groups.values():
        _Pack(backbone, queue, max(1, pack_size), finish).run()
    return [results[i] for i in range(len(requests))]


class _Pack:
    """One group's users trained in a pack of slots, joining and leaving at syncs.

    Between syncs the host only queues work: each step's per-slot losses and update masks stay on
    the device. A sync — when a user has run all its steps, or every `SYNC_EVERY` steps — reads
    them back at once, fails users whose loss or gradient was non-finite (their slots were
    already masked out of every update from that step on), evaluates finished users together and
    fills the freed slots from the queue.
    """

    def __init__(self, backbone: Backbone, queue: deque[_Member], pack_size: int,
                 finish: Callable[[int, UserResult], None]) -> None:
        first = queue[0].request
        self.backbone, self.queue, self.finish = backbone, queue, finish
        self.slots = min(pack_size, len(queue))
        self.prefixes = PackedPrefixes(backbone, first.spec, self.slots)
        self.optimizer = PackedAdamW(list(self.prefixes.parameters()), self.slots)
        self.precision = first.config.precision
        self.members: list[_Member | None] = [None] * self.slots
        self.failed = torch.zeros(self.slots, dtype=torch.bool, device=backbone.device)
        self.history: list[torch.Tensor] = []  # per step since the last sync: [2, slots] (loss, updated)

    def run(self) -> None:
        self.fill()
        while any(self.members):
            self.step()
            if len(self.history) >= SYNC_EVERY or any(m is not None and m.done for m in self.members):
                self.sync()
                self.fill()

    def fill(self) -> None:
        for slot, member in enumerate(self.members):
            if member is None and self.queue:
                member = self.members[slot] = self.queue.popleft()
                request = member.request
                user = UserPrefix(self.backbone, request.spec, member.generator, request.start)
                self.prefixes.load(slot, user.to(self.backbone.device))
                self.optimizer.join(slot, request.config, request.config.learning_rate(request.spec.method))
                self.failed[slot] = False

    def step(self) -> None:
        items, owners = [], []
        for slot, member in enumerate(self.members):
            if member is not None:
                batch = member.next_batch()
                items += batch
                owners += [slot] * len(batch)
        device = self.backbone.device
        owner = to_device(torch.tensor(owners), device)
        with autocast(device, self.precision):
            rows = {name: value[owner] for name, value in self.prefixes().items()}
            loss_sum, count = row_losses(self.backbone, collate(self.backbone, items, device), rows)
        sums = torch.zeros(self.slots, device=device).index_add(0, owner, loss_sum.float())
        tokens = torch.zeros(self.slots, device=device).index_add(0, owner, count.float())
        present = torch.zeros(self.slots, dtype=torch.bool, device=device).index_fill(0, owner, True)
        per_slot = sums / tokens  # each user's loss is normalized by its own tokens only
        usable = present & ~self.failed & torch.isfinite(per_slot)
        # A non-finite or failed user is left out whole: nothing of it reaches the others.
        torch.where(usable, per_slot, 0.0).sum().backward()
        updated = self.optimizer.step(usable)
        self.failed |= present & ~updated
        self.history.append(torch.stack([per_slot.detach(), updated.float()]))

    def sync(self) -> None:
        record = torch.stack(self.history).cpu()  # [steps, 2, slots]: the one read-back of many steps
        self.history = []
        finished: list[tuple[int, _Member]] = []
        for slot, member in enumerate(self.members):
            if member is None:
                continue
            losses, updated = record[:, 0, slot].tolist(), record[:, 1, slot].tolist()
            first_step = len(member.curve)
            if not all(updated):
                bad = updated.index(0.0)
                failure = (f"user {member.request.user!r}: non-finite loss or gradient at step {first_step + bad} "
                           f"on training examples {sorted(member.batches[bad])}")
                log.warning("%s", failure)
                self.members[slot] = None
                self.finish(member.index, UserResult(member.request.user, steps=first_step + bad,
                                                     loss_curve=member.curve + losses[:bad], error=failure))
                continue
            member.curve += losses
            member.batches = []
            if member.done:
                self.members[slot] = None
                finished.append((slot, member))
        if finished:
            self.publish(finished)

    def publish(self, finished: list[tuple[int, _Member]]) -> None:
        """Results for users that ran all their steps, evaluated together in shared batches."""
        with torch.no_grad():
            stacked = self.prefixes()
        on_device = [{k: v[slot] for k, v in stacked.items()} for slot, _ in finished]
        with autocast(self.backbone.device, self.precision):
            losses = evaluate(self.backbone, [(t, m.evals) for t, (_, m) in zip(on_device, finished, strict=True)])
            baselines = evaluate(self.backbone, [(None, m.evals) for _, m in finished])
        tensors = [{k: v.float().cpu() for k, v in t.items()} for t in on_device]
        for (_, member), own, loss, baseline in zip(finished, tensors, losses, baselines, strict=True):
            self.finish(member.index, UserResult(
                user=member.request.user, tensors=own, eval_loss=loss, baseline_eval_loss=baseline,
                loss_curve=member.curve, steps=len(member.curve), train_examples=len(member.train),
                eval_examples=len(member.evals)))


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast for `precision="bfloat16"` (parameters stay float32); a no-op for float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def train_user(backbone: Backbone, request: UserRequest) -> UserResult:
    """Train one user alone; raises WorkerError (naming the user and example) on bad input."""
    result, = train_users(backbone, [request], pack_size=1)
    if not result.ok:
        raise WorkerError(result.error)
    return result
