"""Quality on a population: does each user's own prefix fit that user's held-out data better than
no prefix and better than another user's prefix?

For each family × method, `--users` synthetic users with distinct styles (`workers/synthetic.py`)
are trained packed; then every user's held-out split is scored three ways — with the user's own
prefix, with none (the frozen backbone), and with the prefix of the user half the population away
(a different greeting, closing and separator). The share column is the share of users whose own
prefix beats both. Goal: ≥ 90% for `prefix` and `ptuning-v2` on GPT-2 and Llama.

    python benchmarks/bench_quality.py [--users 50] [--examples 32] [--steps 60] [--families gpt2,llama,t5]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefixfleet.workers.backbone import load_backbone  # noqa: E402
from prefixfleet.workers.data import Example  # noqa: E402
from prefixfleet.workers.spec import METHODS, PrefixSpec, TrainConfig  # noqa: E402
from prefixfleet.workers.synthetic import user_rows  # noqa: E402
from prefixfleet.workers.tiny import build_backbone  # noqa: E402
from prefixfleet.workers.trainer import UserRequest, evaluate, prepare, train_users  # noqa: E402

GOAL = 0.90
GOAL_ON = {("gpt2", "prefix"), ("gpt2", "ptuning-v2"), ("llama", "prefix"), ("llama", "ptuning-v2")}


def population(users: int, examples: int, spec: PrefixSpec, config: TrainConfig) -> list[UserRequest]:
    return [UserRequest(f"user-{i:05d}", [Example(prompt=r["prompt"], completion=r["completion"])
                                          for r in user_rows(i, examples)], spec, config) for i in range(users)]


def score(backbone, requests: list[UserRequest], pack: int) -> dict[str, float]:
    """Mean held-out loss own / none / other, and the share of users whose own prefix beats both."""
    results = train_users(backbone, requests, pack_size=pack)
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} users failed, first: {failed[0]}")
    evals = [prepare(backbone, request)[1] for request in requests]  # the same hold-out training used
    n = len(requests)
    other = [(i + n // 2) % n for i in range(n)]
    device = backbone.device
    prefixes = [{k: v.to(device) for k, v in r.tensors.items()} for r in results]
    crossed = evaluate(backbone, [(prefixes[other[i]], evals[i]) for i in range(n)])
    own = [r.eval_loss for r in results]
    none = [r.baseline_eval_loss for r in results]
    wins = sum(o < min(b, c) for o, b, c in zip(own, none, crossed, strict=True))
    return {"own": statistics.mean(own), "none": statistics.mean(none), "other": statistics.mean(crossed),
            "share": wins / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pack", type=int, default=16)
    parser.add_argument("--virtual-tokens", type=int, default=8)
    parser.add_argument("--families", default="gpt2,llama,t5")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    config = TrainConfig(steps=args.steps, batch_size=args.batch)
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, {args.device}; "
          f"{args.users} users x {args.examples} examples (20% held out), {args.steps} steps x batch {args.batch}, "
          f"{args.virtual_tokens} virtual tokens, packs of {args.pack}; tiny random-init backbones (hidden 64, 2 layers)")
    print(f"{'family':9} {'method':11} {'own':>7} {'none':>7} {'other':>7} {'own beats both':>15} {'goal':>6} "
          f"{'seconds':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            backbone = load_backbone(str(build_backbone(Path(tmp) / family, family)), device=args.device)
            for method in args.methods.split(","):
                spec = PrefixSpec(method=method, num_virtual_tokens=args.virtual_tokens)
                start = time.perf_counter()
                row = score(backbone, population(args.users, args.examples, spec, config), args.pack)
                goal = ("met" if row["share"] >= GOAL else "MISSED") if (family, method) in GOAL_ON else "-"
                print(f"{family:9} {method:11} {row['own']:7.3f} {row['none']:7.3f} {row['other']:7.3f} "
                      f"{row['share']:14.0%} {goal:>6} {time.perf_counter() - start:8.0f}", flush=True)


if __name__ == "__main__":
    main()
