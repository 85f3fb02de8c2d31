"""Training speed and quality, ours beside the anchors, in one run.

  1. One user at a time: our trainer (pack of one) vs PEFT's PrefixTuningConfig on the same tiny
     GPT-2, same data, steps, batch and learning rate: seconds per user and eval loss.
  2. Many users: ours packed (continuous batching) vs the PEFT loop (backbone loaded once, one
     user after another) vs naive per-user processes (each loads the backbone): users per hour.

    python benchmarks/bench_training.py [--users 64] [--examples 32] [--steps 30] [--naive-users 4]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time

import torch
from peft import PrefixTuningConfig, get_peft_model
from torch.nn import functional as F

from prefixfleet.workers.backbone import load_backbone
from prefixfleet.workers.data import Example, collate, encode, holdout
from prefixfleet.workers.spec import PrefixSpec, TrainConfig
from prefixfleet.workers.synthetic import user_rows
from prefixfleet.workers.tiny import build_backbone
from prefixfleet.workers.trainer import UserRequest, train_users

SPEC = PrefixSpec(method="prefix", num_virtual_tokens=8, reparam_hidden=512)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pack", type=int, default=64)
    parser.add_argument("--single-users", type=int, default=4, help="users timed in part 1")
    parser.add_argument("--naive-users", type=int, default=4, help="users timed the naive way (extrapolated)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    config = TrainConfig(steps=args.steps, batch_size=args.batch)
    path = build_backbone(tempfile.mkdtemp() + "/bb", "gpt2", hidden=args.hidden, layers=args.layers)
    backbone = load_backbone(str(path), device=args.device)
    print(f"backbone: tiny GPT-2 hidden={args.hidden} layers={args.layers} on {args.device}, "
          f"threads={torch.get_num_threads()}; {args.examples} examples/user, {args.steps} steps, batch {args.batch}")

    # 1. one user at a time
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

    # 2. many users
    jobs = [UserRequest(f"u{i}", user_examples(i, args.examples), SPEC, config) for i in range(args.users)]
    start = time.perf_counter()
    packed = train_users(backbone, jobs, pack_size=args.pack)
    packed_s = time.perf_counter() - start
    start = time.perf_counter()
    loop_losses = [peft_train_user(backbone, job.examples, config) for job in jobs]
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=min(args.naive_users, mp.cpu_count())) as pool:
        pool.map(_naive_worker, [(str(path), i, args.examples, config) for i in range(args.naive_users)])
    naive_per_user = (time.perf_counter() - start) / args.naive_users
    rate = lambda seconds, users: 3600 * users / seconds  # noqa: E731
    print(f"\n2. {args.users} users x {args.examples} examples, {args.steps} steps each")
    print(f"   {'':22} {'users/hour':>11} {'mean eval loss':>15} {'vs PEFT loop':>13}")
    print(f"   {f'ours packed ({args.pack})':22} {rate(packed_s, args.users):11.0f} "
          f"{statistics.mean(r.eval_loss for r in packed):15.4f} {loop_s / packed_s:12.2f}x")
    print(f"   {'PEFT loop':22} {rate(loop_s, args.users):11.0f} {statistics.mean(loop_losses):15.4f} {1:12.2f}x")
    print(f"   {'naive processes':22} {3600 / naive_per_user:11.0f} {'':>15} {loop_s / args.users / naive_per_user:12.2f}x"
          f"   (timed on {args.naive_users} users)")


if __name__ == "__main__":
    main()
