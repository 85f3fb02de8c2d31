"""Training speed and quality, ours beside the anchors, in one run.

  1. One user at a time: our trainer (pack of one) vs PEFT's PrefixTuningConfig on the same tiny
     GPT-2, same data, steps, batch and learning rate: seconds per user and eval loss.
  2. Many users: ours packed (continuous batching) vs the PEFT loop (backbone loaded once, one
     user after another) vs naive per-user processes (each loads the backbone): users per hour.
  3. Step overhead at packs of 8, 32 and 64: the time of a training step minus its forward and
     backward (collate, the pack's prefixes, the backbone forward and backward: the same work in
     both), for today's trainer and the per-user-optimizer trainer of BEFORE (run from a git
     worktree in a subprocess). Evaluation is timed apart and left out of the step.

    python benchmarks/bench_training.py [--users 64] [--examples 32] [--steps 30] [--naive-users 4]
    python benchmarks/bench_training.py --device cuda --hidden 1024 --layers 24 --users 1000 --loop-users 100
        # GPT-2-medium size; the PEFT loop's time per user is taken on 100 of the 1,000
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from peft import PrefixTuningConfig, get_peft_model
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.old_commit import old_package, remove_old_package  # noqa: E402
from prefixfleet.workers import trainer  # noqa: E402
from prefixfleet.workers.backbone import Backbone, load_backbone  # noqa: E402
from prefixfleet.workers.data import Example, collate, encode, holdout  # noqa: E402
from prefixfleet.workers.spec import PrefixSpec, TrainConfig  # noqa: E402
from prefixfleet.workers.synthetic import user_rows  # noqa: E402
from prefixfleet.workers.tiny import build_backbone  # noqa: E402
from prefixfleet.workers.trainer import UserRequest, train_users  # noqa: E402

SPEC = PrefixSpec(method="prefix", num_virtual_tokens=8, reparam_hidden=512)
BEFORE = "fed55e2"  # the trainer with one torch AdamW, clip and loss.item() per user per step


def user_examples(index: int, count: int) -> list[Example]:
    return [Example(prompt=r["prompt"], completion=r["completion"]) for r in user_rows(index, count)]


def peft_train_user(backbone, examples: list[Example], config: TrainConfig) -> float:
    """PEFT prefix tuning for one user, same batches/schedule as ours; returns eval loss."""
    train, evals = holdout(examples, config.eval_fraction)
    limit = config.max_length
    train_enc, eval_enc = encode(backbone, train, user="u", limit=limit), encode(backbone, evals, user="u", limit=limit)
    peft_config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=SPEC.num_virtual_tokens,
                                     prefix_projection=True, encoder_hidden_size=SPEC.reparam_hidden)
    model = get_peft_model(backbone.model, peft_config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate("prefix"), weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, (config.steps - s) / config.steps))
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    for _ in range(config.steps):
        if not order:
            order = torch.randperm(len(train_enc), generator=generator).tolist()
        take, order = order[: config.batch_size], order[config.batch_size:]
        batch = collate(backbone, [train_enc[i] for i in take])
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    with torch.no_grad():
        batch = collate(backbone, eval_enc)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits, labels = logits[:, :-1], batch.labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    return loss.item()


def _naive_worker(args: tuple[str, int, int, TrainConfig]) -> float:
    """One user in a fresh process that loads the backbone itself (the naive way)."""
    path, index, count, config = args
    torch.set_num_threads(1)
    backbone = load_backbone(path)
    result, = train_users(backbone, [UserRequest(f"u{index}", user_examples(index, count), SPEC, config)], pack_size=1)
    return result.eval_loss


class StepClock:
    """Where one `train_users` call spends its time: in tokenizing and evaluation (`prepare`,
    `evaluate`), in the forward and backward every packed trainer must run (`collate`,
    `row_losses`, `Tensor.backward`), and the rest — the overhead. Only the outermost timed call
    counts, so evaluation's own forwards stay evaluation. On CUDA each timed call synchronizes."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.depth = device, 0
        self.seconds = {"outside": 0.0, "fwd/bwd": 0.0}

    def wrap(self, function, kind: str):
        def call(*args, **kwargs):
            if self.depth:
                return function(*args, **kwargs)
            self.depth += 1
            self.sync()
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[kind] += time.perf_counter() - start
                self.depth -= 1
        return call

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, backbone: Backbone, jobs: list[UserRequest], pack: int) -> float:
        patches = [(trainer, "prepare", "outside"), (trainer, "evaluate", "outside"), (trainer, "collate", "fwd/bwd"),
                   (trainer, "row_losses", "fwd/bwd"), (torch.Tensor, "backward", "fwd/bwd")]
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        for owner, name, kind in patches:
            setattr(owner, name, self.wrap(getattr(owner, name), kind))
        try:
            return timed_pack(backbone, jobs, pack)
        finally:
            for owner, name, function in originals:
                setattr(owner, name, function)


def timed_pack(backbone: Backbone, jobs: list[UserRequest], pack: int) -> float:
    start = time.perf_counter()
    train_users(backbone, jobs, pack_size=pack)
    return time.perf_counter() - start


def timings(backbone: Backbone, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Per pack size, one full pack of users with equal steps: seconds in all, per kind of work,
    and (on CUDA, where the clock's syncs cost time) in all again without the clock."""
    train_users(backbone, [UserRequest("warm-up", user_examples(0, args.examples), SPEC)], pack_size=1)
    config = TrainConfig(steps=args.overhead_steps, batch_size=args.batch)
    out = {}
    for pack in map(int, args.overhead_packs.split(",")):
        jobs = [UserRequest(f"u{i}", user_examples(i, args.examples), SPEC, config) for i in range(pack)]
        clock = StepClock(backbone.device)
        total = clock.run(backbone, jobs, pack)
        cuda = backbone.device.type == "cuda"
        plain = timed_pack(backbone, jobs, pack) if cuda else total
        syncs = host_syncs(backbone, jobs, pack) / args.overhead_steps if cuda else float("nan")
        out[str(pack)] = {"total": total, "plain": plain, "syncs": syncs, **clock.seconds}
    return out


def host_syncs(backbone: Backbone, jobs: list[UserRequest], pack: int) -> int:
    """How many times the host waits for the GPU in one run (torch's sync debug mode), all told:
    steps, syncs of the pack, tokenizing and evaluation."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_users(backbone, jobs, pack_size=pack)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def overhead_table(args: argparse.Namespace, path: str, backbone: Backbone) -> None:
    """Part 3: step overhead, today's trainer beside BEFORE's, at each pack size."""
    with tempfile.TemporaryDirectory() as tmp:
        shim = old_package(Path(tmp), BEFORE)
        try:
            command = [sys.executable, "-m", "benchmarks.bench_training", "--timings-only", "--backbone-path", path,
                       "--overhead-packs", args.overhead_packs, "--overhead-steps", str(args.overhead_steps),
                       "--examples", str(args.examples), "--batch", str(args.batch), "--device", args.device]
            env = os.environ | {"PYTHONPATH": str(shim)}
            before = json.loads(subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True,
                                               text=True).stdout.splitlines()[-1])
        finally:
            remove_old_package(Path(tmp))
    today = timings(backbone, args)
    steps = args.overhead_steps
    print(f"\n3. step overhead: one full pack, {steps} steps, batch {args.batch} per user; ms per step. "
          "fwd/bwd: collate, backbone forward and backward; overhead: the rest of a step (optimizer, "
          "clipping, schedules, the pack's prefixes, syncs); users/h: whole run, results included; "
          "syncs/step: every wait of the host for a GPU in a run, over its steps (nan on CPU)")
    print(f"   {'pack':>4} {'fwd/bwd before':>15} {'fwd/bwd today':>14} {'overhead before':>16} "
          f"{'overhead today':>15} {'ratio':>6} {'users/h before':>15} {'users/h today':>14} "
          f"{'syncs/step before':>18} {'syncs/step today':>17}")
    for pack in args.overhead_packs.split(","):
        runs = {"old": before[pack], "new": today[pack]}
        fwd = {k: 1e3 * t["fwd/bwd"] / steps for k, t in runs.items()}
        over = {k: 1e3 * (t["total"] - t["outside"] - t["fwd/bwd"]) / steps for k, t in runs.items()}
        rate = {k: 3600 * int(pack) / t["plain"] for k, t in runs.items()}
        print(f"   {int(pack):4d} {fwd['old']:15.1f} {fwd['new']:14.1f} {over['old']:16.1f} {over['new']:15.1f} "
              f"{over['old'] / over['new']:5.1f}x {rate['old']:15.0f} {rate['new']:14.0f} "
              f"{runs['old']['syncs']:18.1f} {runs['new']['syncs']:17.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pack", type=int, default=64)
    parser.add_argument("--single-users", type=int, default=4, help="users timed in part 1")
    parser.add_argument("--naive-users", type=int, default=4, help="users timed the naive way (extrapolated)")
    parser.add_argument("--loop-users", type=int, default=0, help="users timed in the PEFT loop (0: all)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overhead-packs", default="8,32,64", help="pack sizes of part 3")
    parser.add_argument("--overhead-steps", type=int, default=20, help="steps per user in part 3")
    parser.add_argument("--skip", default="", help="parts to leave out, e.g. 1,2")
    parser.add_argument("--timings-only", action="store_true", help=argparse.SUPPRESS)  # part 3's subprocess
    parser.add_argument("--backbone-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timings_only:
        print(json.dumps(timings(load_backbone(args.backbone_path, device=args.device), args)))
        return
    config = TrainConfig(steps=args.steps, batch_size=args.batch)
    path = build_backbone(tempfile.mkdtemp() + "/bb", "gpt2", hidden=args.hidden, layers=args.layers)
    backbone = load_backbone(str(path), device=args.device)
    skip = set(args.skip.split(","))
    print(f"backbone: tiny GPT-2 hidden={args.hidden} layers={args.layers} on {args.device}, "
          f"threads={torch.get_num_threads()}; {args.examples} examples/user, {args.steps} steps, batch {args.batch}")

    if "3" not in skip:
        overhead_table(args, str(path), backbone)
    if "1" not in skip:
        single_user(args, backbone, config)
    if "2" not in skip:
        many_users(args, path, backbone, config)


def single_user(args: argparse.Namespace, backbone: Backbone, config: TrainConfig) -> None:
    ours_s, ours_loss, peft_s, peft_loss = [], [], [], []
    for index in range(args.single_users):
        examples = user_examples(index, args.examples)
        start = time.perf_counter()
        result, = train_users(backbone, [UserRequest(f"u{index}", examples, SPEC, config)], pack_size=1)
        ours_s.append(time.perf_counter() - start)
        ours_loss.append(result.eval_loss)
        start = time.perf_counter()
        peft_loss.append(peft_train_user(backbone, examples, config))
        peft_s.append(time.perf_counter() - start)
    print(f"\n1. single user (mean over {args.single_users} users)")
    print(f"   {'':8} {'s/user':>8} {'eval loss':>10}")
    print(f"   {'ours':8} {statistics.mean(ours_s):8.3f} {statistics.mean(ours_loss):10.4f}")
    print(f"   {'PEFT':8} {statistics.mean(peft_s):8.3f} {statistics.mean(peft_loss):10.4f}")
    print(f"   speed ratio ours/PEFT: {statistics.mean(peft_s) / statistics.mean(ours_s):.2f}x")


def many_users(args: argparse.Namespace, path: Path, backbone: Backbone, config: TrainConfig) -> None:
    jobs = [UserRequest(f"u{i}", user_examples(i, args.examples), SPEC, config) for i in range(args.users)]
    start = time.perf_counter()
    packed = train_users(backbone, jobs, pack_size=args.pack)
    packed_s = time.perf_counter() - start
    looped = jobs[: args.loop_users or args.users]  # the loop's time per user does not depend on how many
    start = time.perf_counter()
    loop_losses = [peft_train_user(backbone, job.examples, config) for job in looped]
    loop_per_user = (time.perf_counter() - start) / len(looped)
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=min(args.naive_users, mp.cpu_count())) as pool:
        pool.map(_naive_worker, [(str(path), i, args.examples, config) for i in range(args.naive_users)])
    naive_per_user = (time.perf_counter() - start) / args.naive_users
    ours_per_user = packed_s / args.users
    ours_loss = statistics.mean(r.eval_loss for r in packed[: len(looped)])  # on the users the loop trained
    print(f"\n2. {args.users} users x {args.examples} examples, {args.steps} steps each; eval loss over the "
          f"{len(looped)} users the PEFT loop trained")
    print(f"   {'':22} {'users/hour':>11} {'mean eval loss':>15} {'vs PEFT loop':>13}")
    print(f"   {f'ours packed ({args.pack})':22} {3600 / ours_per_user:11.0f} {ours_loss:15.4f} "
          f"{loop_per_user / ours_per_user:12.2f}x")
    print(f"   {'PEFT loop':22} {3600 / loop_per_user:11.0f} {statistics.mean(loop_losses):15.4f} {1:12.2f}x"
          f"   (timed on {len(looped)} users)")
    print(f"   {'naive processes':22} {3600 / naive_per_user:11.0f} {'':>15} {loop_per_user / naive_per_user:12.2f}x"
          f"   (timed on {args.naive_users} users)")


if __name__ == "__main__":
    main()
