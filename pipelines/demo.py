"""The product end to end on embedded defaults: a tiny backbone, synthetic per-user data (each user
writes in a style of their own), training on local Ray, publishing, and the check a user can see:
each user's own prefix gives the lowest loss on their held-out examples — lower than no prefix and
lower than another user's prefix."""
from __future__ import annotations

import json
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
from prefixfleet.workers.spec import PrefixSpec, TrainConfig
from prefixfleet.workers.synthetic import dataset, style_of, user_id, user_rows
from prefixfleet.workers.tiny import build_backbone
from prefixfleet.workers.trainer import UserRequest, evaluate, prepare

NAMESPACE = "demo"
EXAMPLES_PER_USER = 24
STEPS = 60
MARGIN = 0.9  # own-prefix loss must be below 90% of both other losses


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

    def to_json(self) -> dict[str, Any]:
        return {"job": self.summary.to_json(), "users": [asdict(r) | {"own_lowest": r.own_lowest} for r in self.rows],
                "own_lowest": self.own_lowest}


def prepare_inputs(root: Path, users: int) -> tuple[Path, Path]:
    """The tiny backbone (built once) and the synthetic dataset as JSONL under `root`."""
    backbone = root / "backbone"
    if not (backbone / "config.json").exists():
        build_backbone(backbone, "gpt2", seed=0)
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


def run_demo(users: int, home: Path, registry: Registry, *, progress: bool | None = None) -> DemoReport:
    if users < 3:
        raise ValueError("the demo needs at least 3 users")
    backbone_dir, data = prepare_inputs(home / "demo", users)
    spec, config = PrefixSpec(), TrainConfig(steps=STEPS)
    summary = run_job(JobRequest(str(data), str(backbone_dir), namespace=NAMESPACE, spec=spec, config=config,
                                 progress=progress), registry, home)
    backbone = load_backbone(str(backbone_dir))
    picks = [0, users // 2, users - 1]
    prefixes = {i: _prefix(registry, backbone, UserKey(NAMESPACE, user_id(i))) for i in picks}
    rows = []
    for position, index in enumerate(picks):
        other = picks[(position + 1) % len(picks)]
        records = user_rows(index, EXAMPLES_PER_USER)
        examples = [Example(prompt=r["prompt"], completion=r["completion"]) for r in records]
        _, evals = prepare(backbone, UserRequest(user_id(index), examples, spec, config))
        none, own, foreign = (evaluate(backbone, [(tensors, evals)])[0]
                              for tensors in (None, prefixes[index], prefixes[other]))
        held_out = holdout(examples, config.eval_fraction)[1][0]
        text, = generate(backbone, [prefixes[index]], [held_out.prompt], max_new_tokens=48)
        rows.append(DemoRow(user_id(index), _style(index), none, own, foreign, user_id(other),
                            held_out.prompt.strip(), held_out.completion, text.strip()))
    return DemoReport(summary, rows)
