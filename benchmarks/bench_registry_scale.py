"""The registry with many registered users: cold resolve latency, publish rate, fsck and gc time,
ours beside vanilla MlflowClient on the same database where MLflow has the same operation.

The registry (embedded: sqlite and a file store, or --tracking-uri) is filled by `registry_fill`
with N users, each in production at version 1 (checked against a real publish first). Then,
through the product:

- cold resolve: a fresh `Registry` (empty cache) resolves `production` of --samples users drawn
  at random, one by one; vanilla: `MlflowClient.get_model_version_by_alias` for the same users;
- publish: --publishes returning users get a new version, promoted (`publish(promote=True)` on
  the bulk read of its chunk, as a job's actor does); vanilla: `create_model_version` plus the
  two `set_registered_model_alias` calls, without our artifact, exactly-once or erasure checks;
- `fsck` (every model, version and object, each artifact hashed) and `gc --keep-last 5`;
- the reads under them beside the path they replaced, on the first --anchor-users users: fsck's
  bulk read (`Catalog.scan`: MLflow's tables read by range) against paging MLflow's own searches
  (a page of models, then their versions), and gc's one search for versions past keep_last against
  the scan of every registered model it replaced; per user, and scaled to the registry.

    python benchmarks/bench_registry_scale.py [--users 1000000] [--samples 1000] [--publishes 300] [--anchor-users 20000]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.registry_fill

from mlflow import MlflowClient  # noqa: E402

from benchmarks.registry_fill import Template, check_equivalent, fill  # noqa: E402
from prefixfleet.registry import Registry, UserKey, fsck, gc  # noqa: E402
from prefixfleet.registry.catalog import Catalog  # noqa: E402
from prefixfleet.workers.spec import PrefixSpec, TrainConfig  # noqa: E402

T = TypeVar("T")
NAMESPACE = "default"
SPEC = PrefixSpec()
TEMPLATE = Template(SPEC.to_json(), TrainConfig(steps=2).settings_json(SPEC.method), "bench-backbone")


def user(i: int) -> UserKey:
    return UserKey(NAMESPACE, f"user-{i:07d}")


def percentiles(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms"


def timed(step: str, call: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    out = call()
    print(f"{step}: {time.perf_counter() - started:.1f} s", flush=True)
    return out, time.perf_counter() - started


def scan_rate(registry: Registry, scan: Callable, users: int) -> float:
    """Seconds per user of paging `scan` from the registry's first user until `users` are read."""
    started, read, cursor = time.perf_counter(), 0, None
    while read < users:
        page, cursor = scan(registry.catalog.inner, f"{registry.prefix}.%", cursor)
        read += len(page)
        if not cursor:
            break
    return (time.perf_counter() - started) / read


def models_rate(registry: Registry, users: int) -> float:
    """Seconds per user of the model scan gc made before it searched versions past keep_last."""
    started, read = time.perf_counter(), 0
    for _ in registry.models():
        read += 1
        if read == users:
            break
    return (time.perf_counter() - started) / read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--publishes", type=int, default=300)
    parser.add_argument("--anchor-users", type=int, default=20_000)
    parser.add_argument("--tracking-uri")
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tracking = args.tracking_uri or f"sqlite:///{root}/mlflow.db"
        check = Registry(f"sqlite:///{root}/check-a.db", (root / "check-a").as_uri(), model_prefix="pf")
        other = Registry(f"sqlite:///{root}/check-b.db", (root / "check-b").as_uri(), model_prefix="pf")
        check_equivalent(check, other, [(user(i), TEMPLATE.artifact(user(i), f"data-{i}")) for i in range(3)], "fill")
        check.close()
        other.close()

        registry = Registry(tracking, (root / "store").as_uri(), model_prefix="pf")
        print(f"# {platform.machine()}, {os.cpu_count()} CPUs; {args.users:,} users; {tracking.split(':')[0]}",
              flush=True)
        _, filled = timed("fill", lambda: fill(
            registry, ((user(i), TEMPLATE.artifact(user(i), f"data-{i}")) for i in range(args.users)), "fill",
            batch=5000, progress=lambda n: n % 100_000 or print(f"  {n:,} users", flush=True)))
        registry.close()

        drawn = [user(rng.randrange(args.users)) for _ in range(args.samples)]
        cold = Registry(tracking, (root / "store").as_uri(), model_prefix="pf")
        ours = []
        for key in drawn:
            started = time.perf_counter()
            assert cold.resolve(key).version == 1
            ours.append(time.perf_counter() - started)
        client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
        vanilla = []
        for key in drawn:
            started = time.perf_counter()
            assert int(client.get_model_version_by_alias(key.model_name("pf"), "production").version) == 1
            vanilla.append(time.perf_counter() - started)
        print(f"cold resolve: ours {percentiles(ours)}; vanilla MlflowClient {percentiles(vanilla)}", flush=True)

        returning = [user(i) for i in rng.sample(range(args.users), 2 * args.publishes)]
        mine, theirs = returning[:args.publishes], returning[args.publishes:]
        started = time.perf_counter()
        for start in range(0, len(mine), 32):
            chunk = mine[start:start + 32]
            published = cold.published(chunk)
            for key in chunk:
                ref = cold.publish(key, TEMPLATE.artifact(key, "new-data"), metrics={"eval_loss": 0.9},
                                   run_id="bench", promote=True, published=published[key])
                assert ref.version == 2
        ours_rate = len(mine) / (time.perf_counter() - started)
        started = time.perf_counter()
        for key in theirs:
            mv = client.create_model_version(key.model_name("pf"), f"file:///nowhere/{key.user_id}", run_id=None)
            for alias in ("candidate", "production"):
                client.set_registered_model_alias(key.model_name("pf"), alias, mv.version)
        vanilla_rate = len(theirs) / (time.perf_counter() - started)
        print(f"publish: ours {ours_rate:.1f}/s, vanilla MlflowClient {vanilla_rate:.1f}/s "
              f"(create + 2 aliases, no artifact or checks)", flush=True)
        for key in theirs:  # back to what a publish leaves, so that fsck checks a consistent registry
            client.delete_model_version(key.model_name("pf"), "2")
            client.set_registered_model_alias(key.model_name("pf"), "production", "1")
            client.set_registered_model_alias(key.model_name("pf"), "candidate", "1")

        report, _ = timed("fsck", lambda: fsck(cold, grace_s=0))
        assert report.faults == [], report.faults[:5]
        print(f"  {report.users:,} users, {report.versions:,} versions, {report.objects:,} objects, no faults",
              flush=True)
        removed, _ = timed("gc --keep-last 5", lambda: gc(cold, keep_last=5))
        print(f"  {len(removed)} versions removed (none is beyond the newest 5)")
        sample = min(args.anchor_users, args.users)
        ours_scan = scan_rate(cold, type(cold.catalog.inner).scan, sample)
        searched = scan_rate(cold, Catalog.scan, sample)
        print(f"fsck's read of {sample:,} users: ours {ours_scan * 1e3:.3f} ms/user, MLflow's searches "
              f"{searched * 1e3:.3f} ms/user ({searched / ours_scan:.1f}x); scaled to {args.users:,}: "
              f"{ours_scan * args.users:.0f} s vs {searched * args.users:.0f} s", flush=True)
        old_gc = models_rate(cold, sample)
        print(f"gc's read before: every model at {old_gc * 1e3:.3f} ms/user, scaled to {args.users:,}: "
              f"{old_gc * args.users:.0f} s", flush=True)
        print(f"fill rate: {args.users / filled:,.0f} users/s")
        cold.close()


if __name__ == "__main__":
    main()
