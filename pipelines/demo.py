"""The product end to end on embedded defaults: a small backbone pretrained here to write orders in
any style, synthetic per-user data (each user writes in a style of their own), training on local
Ray, publishing, and two checks a user can see. Losses: each user's own prefix gives the lowest loss
on their held-out examples, lower than no prefix and than another user's prefix. Text: generations
from a style-free prompt carry the user's own greeting and sign-off with their own prefix, and not
with no prefix or another user's."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefixfleet.pipelines.training.job import JobRequest, JobSummary, run_job
from prefixfleet.registry import NotFound, Registry, UserKey
from prefixfleet.workers.artifact import deserialize
from prefixfleet.workers.backbone import Backbone, load_backbone
from prefixfleet.workers.data import Example, holdout
from prefixfleet.workers.generate import generate
from prefixfleet.workers.prefix import PrefixTensors
from prefixfleet.workers.pretrain import Pretraining, is_pretrained, pretrain_backbone
from prefixfleet.workers.spec import PrefixSpec, TrainConfig
from prefixfleet.workers.synthetic import any_style_records, dataset, style_of, user_id, user_rows
from prefixfleet.workers.trainer import UserRequest, evaluate, prepare

log = logging.getLogger(__name__)

NAMESPACE = "demo"
EXAMPLES_PER_USER = 24
PRETRAIN_RECORDS = 12_800  # one pass in 200 batches of 64: about 15 s on 2 cores
# A pretrained backbone is knocked off its fluency by DEFAULT_LR's steps, which suit random ones.
CONFIG = TrainConfig(steps=60, lr=3e-3)
MIN_USERS, SHOWN = 10, 12
MARGIN = 0.9  # own-prefix loss must be below 90% of both other losses
STYLE_GOAL = 0.8  # share of shown users whose own-prefix generation carries their style, at least
CONTROL_LIMIT = 0.2  # the same share with no prefix or another user's prefix, at most


@dataclass(frozen=True)
class DemoRow:
    user_id: str
    style: str
    loss_no_prefix: float
    loss_own_prefix: float
    loss_other_prefix: float
    other_user: str
    prompt: str
    expected: str
    generated: str
    generated_no_prefix: str
    generated_other_prefix: str
    styled: bool  # the own-prefix generation opens with the user's greeting and ends with their sign-off
    styled_no_prefix: bool
    styled_other_prefix: bool

    @property
    def own_lowest(self) -> bool:
        return self.loss_own_prefix < MARGIN * min(self.loss_no_prefix, self.loss_other_prefix)


@dataclass
class DemoReport:
    summary: JobSummary
    rows: list[DemoRow]

    @property
    def own_lowest(self) -> bool:
        return all(row.own_lowest for row in self.rows)

    @property
    def shares(self) -> dict[str, float]:
        """Share of shown users whose generation carries their own style, by whose prefix made it."""
        count = len(self.rows)
        return {"own": sum(r.styled for r in self.rows) / count,
                "none": sum(r.styled_no_prefix for r in self.rows) / count,
                "other": sum(r.styled_other_prefix for r in self.rows) / count}

    @property
    def styled(self) -> bool:
        shares = self.shares
        return shares["own"] >= STYLE_GOAL and max(shares["none"], shares["other"]) <= CONTROL_LIMIT

    def to_json(self) -> dict[str, Any]:
        return {"job": self.summary.to_json(), "users": [asdict(r) | {"own_lowest": r.own_lowest} for r in self.rows],
                "own_lowest": self.own_lowest, "style_shares": self.shares, "styled": self.styled}


def prepare_inputs(root: Path, users: int) -> tuple[Path, Path]:
    """The demo backbone (pretrained once per home) and the synthetic dataset as JSONL under `root`."""
    backbone, records, settings = root / "backbone", any_style_records(PRETRAIN_RECORDS), Pretraining()
    if not is_pretrained(backbone, records, settings):
        log.info("pretraining the demo backbone on %d orders written in every style (once per home)", len(records))
        loss = pretrain_backbone(backbone, records, settings)
        log.info("pretrained: final loss %.3f", loss)
    data = root / f"data-{users}.jsonl"
    with data.open("w") as out:
        for row in dataset(users, EXAMPLES_PER_USER):
            out.write(json.dumps(row) + "\n")
    return backbone, data


def _prefix(registry: Registry, backbone: Backbone, key: UserKey) -> PrefixTensors:
    """The user's production prefix (its candidate when the gate kept it out of production)."""
    try:
        ref = registry.resolve(key, "production")
    except NotFound:
        ref = registry.resolve(key, "candidate")
    tensors, _ = deserialize(registry.fetch_ref(ref), backbone_fingerprint=backbone.fingerprint)
    return tensors


def _style(index: int) -> str:
    style = style_of(index)
    return f"{style.greeting} …{style.separator.strip() or ' '}… {style.closing}" + (" (CAPS)" if style.shout else "")


def shown_users(users: int) -> list[int]:
    """Up to SHOWN user indices spread over the population."""
    if users <= SHOWN:
        return list(range(users))
    return [round(i * (users - 1) / (SHOWN - 1)) for i in range(SHOWN)]


def run_demo(users: int, home: Path, registry: Registry, *, progress: bool | None = None) -> DemoReport:
    if users < MIN_USERS:
        raise ValueError(f"the demo needs at least {MIN_USERS} users")
    backbone_dir, data = prepare_inputs(home / "demo", users)
    spec = PrefixSpec()
    summary = run_job(JobRequest(str(data), str(backbone_dir), namespace=NAMESPACE, spec=spec, config=CONFIG,
                                 progress=progress), registry, home)
    backbone = load_backbone(str(backbone_dir))
    picks = shown_users(users)
    others = picks[1:] + picks[:1]
    prefixes = {i: _prefix(registry, backbone, UserKey(NAMESPACE, user_id(i))) for i in picks}
    held_out = []
    losses = []
    for index, other in zip(picks, others, strict=True):
        examples = [Example(prompt=r["prompt"], completion=r["completion"]) for r in user_rows(index, EXAMPLES_PER_USER)]
        _, evals = prepare(backbone, UserRequest(user_id(index), examples, spec, CONFIG))
        losses.append([evaluate(backbone, [(tensors, evals)])[0] for tensors in (None, prefixes[index], prefixes[other])])
        held_out.append(holdout(examples, CONFIG.eval_fraction)[1][0])
    prompts = [example.prompt for example in held_out]
    # Every shown user's prompt in one batch: each row with its own prefix, another's, or none.
    own = generate(backbone, [prefixes[i] for i in picks], prompts, max_new_tokens=32)
    foreign = generate(backbone, [prefixes[i] for i in others], prompts, max_new_tokens=32)
    plain = generate(backbone, [None] * len(picks), prompts, max_new_tokens=32)
    rows = []
    for k, (index, other) in enumerate(zip(picks, others, strict=True)):
        style = style_of(index)
        rows.append(DemoRow(user_id(index), _style(index), *losses[k], user_id(other), prompts[k].strip(),
                            held_out[k].completion, own[k].strip(), plain[k].strip(), foreign[k].strip(),
                            style.carried_by(own[k]), style.carried_by(plain[k]), style.carried_by(foreign[k])))
    return DemoReport(summary, rows)
