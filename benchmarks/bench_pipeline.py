"""Training throughput, side by side in one run, on local Ray with the tiny GPT-2 backbone:

- ours: `run_job` — long-lived trainer actors (backbone loaded once each), packed training,
  gate, publish to the embedded registry (sqlite + file://), one MLflow run. Cold (actors started
  by the job) and warm (actors already running, as in a long-lived cluster).
- naive: one Ray task per user that loads the backbone itself, trains that user alone and
  publishes it; `max_calls=1` (Ray's default for GPU tasks: a fresh process per task) and with
  worker reuse (the CPU-task default).
- pure compute: `train_users` in plain processes, as many as ours has actors, no Ray, no registry,
  timed around training only. Ray + registry overhead = pure rate / ours (warm) rate - 1.
- PEFT: a plain loop in one process with peft's PrefixTuningConfig (same steps, batch, lr, prefix
  length and MLP width); it neither evaluates nor publishes.

Rates are users per minute; the slow baselines run on a sample of users (rates are per user).

    python benchmarks/bench_pipeline.py --users 1000
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import random
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import ray

from prefixfleet.pipelines.cluster import actor_env, connect_ray
from prefixfleet.pipelines.training.actor import UserTrainer
from prefixfleet.pipelines.training.data import UserData
from prefixfleet.pipelines.training.job import JobRequest, run_job, start_fleet
from prefixfleet.pipelines.training.plan import JobContext
from prefixfleet.registry import Registry, RegistryAddress, UserKey
from prefixfleet.workers.data import Example
from prefixfleet.workers.spec import PrefixSpec, TrainConfig
from prefixfleet.workers.synthetic import dataset, user_id, user_rows
from prefixfleet.workers.tiny import build_backbone


def examples_of(index: int, count: int) -> list[Example]:
    return [Example(prompt=r["prompt"], completion=r["completion"]) for r in user_rows(index, count)]


def pure_share(backbone: str, users: list[int], examples: int, config: TrainConfig, pack_size: int) -> float:
    """Seconds `train_users` takes for `users` in this process (1 thread, as a 1-CPU Ray actor)."""
    import torch

    from prefixfleet.workers.backbone import load_backbone
    from prefixfleet.workers.trainer import UserRequest, train_users

    torch.set_num_threads(1)
    model = load_backbone(backbone)
    jobs = [UserRequest(user_id(i), examples_of(i, examples), PrefixSpec(), config) for i in users]
    started = time.perf_counter()
    train_users(model, jobs, pack_size=pack_size)
    return time.perf_counter() - started


def peft_loop(backbone: str, users: list[int], examples: int, config: TrainConfig) -> float:
    """Seconds a plain PEFT prefix-tuning loop takes for `users`, one after another."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(backbone)
    model = AutoModelForCausalLM.from_pretrained(backbone)
    model.requires_grad_(False)
    spec = PrefixSpec()
    started = time.perf_counter()
    for index in users:
        rows = []
        for e in examples_of(index, examples):
            prompt, target = tok(e.prompt).input_ids, tok(e.completion).input_ids + [tok.eos_token_id]
            rows.append((prompt + target, [-100] * len(prompt) + target))
        peft_model = get_peft_model(model, PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=spec.num_virtual_tokens, prefix_projection=True,
            encoder_hidden_size=spec.reparam_hidden))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate(spec.method))
        rng = random.Random(index)
        for _ in range(config.steps):
            batch = rng.sample(rows, min(config.batch_size, len(rows)))
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in batch])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        get_peft_model_state_dict(peft_model)
    return time.perf_counter() - started


def naive_user(backbone: str, registry: RegistryAddress, user: UserData, context: JobContext) -> str:
    """The naive way: this task loads the backbone, trains one user alone and publishes it."""
    trainer = UserTrainer(backbone, registry)
    try:
        outcome, = trainer.train_users([user], context)
    finally:
        trainer.close()
    return outcome.status


def run_naive(backbone: str, registry: Registry, users: list[int], examples: int, config: TrainConfig,
              max_calls: int, namespace: str) -> float:
    naive = ray.remote(num_cpus=1, max_calls=max_calls)(naive_user)
    context = JobContext("naive", "train", backbone, config, 1, PrefixSpec())
    env = {"runtime_env": {"env_vars": actor_env(True)}}
    tasks = []
    for i in users:
        tasks.append(UserData(UserKey(namespace, user_id(i)), list(examples_of(i, examples))))
    started = time.perf_counter()
    statuses = ray.get([naive.options(**env).remote(backbone, registry.address, t, context) for t in tasks])
    elapsed = time.perf_counter() - started
    assert statuses == ["trained"] * len(tasks), statuses
    return elapsed


def in_processes(fn: Callable[..., float], calls: list[tuple]) -> float:
    """Run `fn(*call)` for each call in its own fresh process, all at once; the longest time."""
    with ProcessPoolExecutor(len(calls), mp_context=multiprocessing.get_context("spawn")) as pool:
        return max(pool.map(fn, *zip(*calls, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=300, help="users for ours (1000 takes ~12 min on 2 cores)")
    parser.add_argument("--naive-users", type=int, default=16)
    parser.add_argument("--reuse-users", type=int, default=48)
    parser.add_argument("--pure-users", type=int, default=64)
    parser.add_argument("--peft-users", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--pack-size", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    backbone = str(build_backbone(work / "backbone", "gpt2", seed=0))
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in dataset(args.users, args.examples)))
    config = TrainConfig(steps=args.steps, batch_size=8)
    connect_ray(None)
    registry = Registry(f"sqlite:///{work / 'mlflow.db'}", (work / "store").as_uri())
    # Half a logical CPU per actor: warm actors given to run_job must leave a CPU free for its Ray Data ingest.
    request = JobRequest(str(data), backbone, config=config, pack_size=args.pack_size, progress=False,
                         actors=os.cpu_count(), actor_cpus=0.5)
    results: dict[str, tuple[int, float]] = {}
    print(f"load average at start {os.getloadavg()[0]:.1f}", flush=True)

    started = time.perf_counter()
    with start_fleet(request, registry, args.users) as fleet:
        fleet.fingerprint()
        startup = time.perf_counter() - started
        actors = len(fleet.actors)
        print(f"ours: {actors} actors up in {startup:.1f}s; training {args.users} users …", flush=True)
        begin = time.perf_counter()
        summary = run_job(request, registry, work, fleet)
        warm = time.perf_counter() - begin
    assert summary.users["trained"] == args.users, summary.users
    results["ours, warm actors (packed + registry)"] = (args.users, warm)
    results["ours, cold (job starts its actors)"] = (args.users, warm + startup)

    print("pure compute …", flush=True)
    sample = list(range(args.pure_users))
    shares = [sample[i::actors] for i in range(actors)]
    results[f"pure train_users, {actors} processes"] = (args.pure_users, in_processes(
        pure_share, [(backbone, share, args.examples, config, args.pack_size) for share in shares]))

    print("naive (max_calls=1) …", flush=True)
    results["naive: task per user, max_calls=1"] = (args.naive_users, run_naive(
        backbone, registry, list(range(args.naive_users)), args.examples, config, 1, "naive"))
    print("naive (worker reuse) …", flush=True)
    results["naive: task per user, worker reuse"] = (args.reuse_users, run_naive(
        backbone, registry, list(range(args.reuse_users)), args.examples, config, 0, "reuse"))

    print("PEFT loop …", flush=True)
    results["PEFT PrefixTuning loop, 1 process"] = (args.peft_users, in_processes(
        peft_loop, [(backbone, list(range(args.peft_users)), args.examples, config)]))

    rate = {name: 60 * users / seconds for name, (users, seconds) in results.items()}
    naive = rate["naive: task per user, max_calls=1"]
    pure = rate[f"pure train_users, {actors} processes"]
    ours = rate["ours, warm actors (packed + registry)"]
    print(f"\n{args.steps} steps x batch 8, {args.examples} examples/user, tiny GPT-2, {os.cpu_count()} CPUs, "
          f"{actors} actors; load average at the end {os.getloadavg()[0]:.1f}")
    print(f"{'method':44} {'users':>6} {'seconds':>8} {'users/min':>10} {'x naive':>8}")
    for name, (users, seconds) in results.items():
        print(f"{name:44} {users:6d} {seconds:8.1f} {rate[name]:10.1f} {rate[name] / naive:8.1f}")
    cold = rate["ours, cold (job starts its actors)"]
    print(f"\nours (cold) vs naive max_calls=1: {cold / naive:.1f}x (goal >= 10x)")
    print(f"Ray + registry overhead vs pure compute: {pure / ours - 1:+.1%} (goal <= 15%)")
    if args.json:
        args.json.write_text(json.dumps({"rates": rate, "results": results, "actors": actors}, indent=2))


if __name__ == "__main__":
    main()
