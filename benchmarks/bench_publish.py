"""Sustained publishing on a PostgreSQL-backed registry: publishes/s and requests per publish.

A publish is what a training job does for a returning user whose candidate passes the gate: the
artifact put to S3 (moto), a new version, the `candidate` and `production` aliases, the
production history and the exactly-once check, from 16 concurrent publishers, each owning its
share of the users as a job's actors do, for --seconds. Two paths side by side on the same servers:

  two-step  `Registry.publish` as candidate, then `Registry.promote`, knowing nothing in advance:
            the path every job took before its plan reached the publish (and what a script's
            publish does today)
  planned   one `Registry.publish(promote=True, published=…)` built on the bulk read each
            publisher makes per chunk of 32 users (counted here), as a job's actor does

on MLflow's SQL store in-process (MLFLOW_TRACKING_URI=postgresql://…) and behind `mlflow server
--workers N` for each N of --workers. PostgreSQL runs durable (fsync on), in a private cluster on
127.0.0.1 like the test fixtures'.

    python benchmarks/bench_publish.py [--seconds 60] [--users 160] [--workers 1 2 4] [--no-fsync]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures: the server launchers

from prefixfleet.registry import ErasureSnapshot, Registry, UserKey  # noqa: E402
from prefixfleet.registry.index import Published  # noqa: E402
from tests.fixtures import servers  # noqa: E402
from tests.fixtures.artifacts import make_artifact  # noqa: E402
from tests.fixtures.counting import CountingCatalog  # noqa: E402
from tests.fixtures.postgres import PostgresServer  # noqa: E402

NAMESPACE, PUBLISHERS, CHUNK = "bench", 16, 32
PATHS = ("two-step", "planned")
TOKENS, WIDTH = 16, 1024  # a 64 KiB float32 prefix


@dataclass
class Result:
    mode: str
    path: str
    publishes: int
    seconds: float
    mlflow_requests: Counter
    store_requests: Counter

    @property
    def rate(self) -> float:
        return self.publishes / self.seconds

    def per_publish(self, counts: Counter) -> float:
        return sum(counts.values()) / max(self.publishes, 1)


class CountingStore:
    """The registry's object store, counting its requests (every call but `uri_for`)."""

    def __init__(self, inner: object) -> None:
        self.inner, self.calls = inner, Counter()

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.inner, name)
        if not callable(attr) or name == "uri_for":
            return attr

        def counted(*args: object, **kwargs: object) -> object:
            self.calls[name] += 1
            return attr(*args, **kwargs)
        return counted


def counted(reg: Registry) -> tuple[CountingCatalog, CountingStore]:
    reg.catalog, reg.store = CountingCatalog(reg.catalog), CountingStore(reg.store)  # type: ignore[assignment]
    reg.tombstones.store = reg.store  # type: ignore[assignment]
    return reg.catalog, reg.store  # type: ignore[return-value]


def publish_once(reg: Registry, key: UserKey, seed: int, run_id: str, erasures: ErasureSnapshot,
                 published: Published | None = None, two_step: bool = False) -> None:
    """One returning user's publish whose gate passed: as `candidate`, promoted to production,
    under the job's erasure snapshot as an actor publishes."""
    artifact = make_artifact(NAMESPACE, key.user_id, data_fingerprint=f"d{seed}", seed=seed, tokens=TOKENS, width=WIDTH)
    if two_step:
        ref = reg.publish(key, artifact, metrics={"eval_loss": 1.0}, run_id=run_id, erasures=erasures)
        reg.promote(key, ref.version)
    else:
        reg.publish(key, artifact, metrics={"eval_loss": 1.0}, run_id=run_id, promote=True, erasures=erasures,
                    published=published)


def sustain(reg: Registry, keys: list[UserKey], seconds: float, path: str) -> tuple[int, float]:
    """PUBLISHERS threads, each owning its share of `keys` (as a job's actors own their users),
    publish new versions of them for `seconds`; the planned path reads each share's plan in bulk
    (one search per CHUNK users) before publishing it, as an actor plans its chunk."""
    seeds, lock, done = itertools.count(1_000_000), threading.Lock(), [0]
    erasures = reg.erasure_snapshot([NAMESPACE])
    deadline = time.monotonic() + seconds

    def publisher(mine: list[UserKey]) -> None:
        while time.monotonic() < deadline:
            for start in range(0, len(mine), CHUNK):
                chunk = mine[start:start + CHUNK]
                plan = reg.published(chunk) if path == "planned" else {}
                for key in chunk:
                    if time.monotonic() >= deadline:
                        return
                    with lock:
                        seed = next(seeds)
                    publish_once(reg, key, seed, f"bench-{path}", erasures, plan.get(key), two_step=path == "two-step")
                    with lock:
                        done[0] += 1

    start = time.monotonic()
    with ThreadPoolExecutor(PUBLISHERS) as pool:
        for future in [pool.submit(publisher, keys[i::PUBLISHERS]) for i in range(PUBLISHERS)]:
            future.result()
    return done[0], time.monotonic() - start


def seed_users(reg: Registry, count: int, tag: str) -> list[UserKey]:
    """Users with one production version each (returning users)."""
    keys = [UserKey(NAMESPACE, f"{tag}{i:06d}") for i in range(count)]
    erasures = reg.erasure_snapshot([NAMESPACE])
    with ThreadPoolExecutor(PUBLISHERS) as pool:
        list(pool.map(lambda k: publish_once(reg, k, 0, "seed", erasures), keys))
    return keys


def measure(mode: str, open_registry: Callable[[], Registry], users: int, seconds: float) -> list[Result]:
    out = []
    with open_registry() as reg:
        seeded = {path: seed_users(reg, users, path[0]) for path in PATHS}
        for path in PATHS:
            catalog, store = counted(reg)
            publishes, took = sustain(reg, seeded[path], seconds, path)
            reg.catalog, reg.store = catalog.inner, store.inner  # type: ignore[assignment]
            reg.tombstones.store = store.inner  # type: ignore[assignment]
            out.append(Result(mode, path, publishes, took, catalog.calls, store.calls))
            print(f"{mode:>12} | {path:>8} | {publishes:>6} in {took:5.1f} s | {out[-1].rate:6.1f}/s | "
                  f"MLflow {out[-1].per_publish(catalog.calls):4.2f}/publish {dict(catalog.calls)} | "
                  f"S3 {out[-1].per_publish(store.calls):3.1f}/publish {dict(store.calls)}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--users", type=int, default=160, help="returning users per path")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--no-fsync", action="store_true", help="PostgreSQL commits skip the disk (as in the tests)")
    args = parser.parse_args()
    for name, value in servers.AWS_TEST_ENV.items():
        os.environ[name] = value
    pg = PostgresServer.launch(durable=not args.no_fsync).wait()
    s3 = servers.launch_s3_server(Path(pg.root.parent, f"{pg.root.name}-s3"), owns_workdir=True).wait()
    launched: list[servers.ServerProcess] = []
    try:
        bucket = servers.create_bucket(s3.url, "bench")
        results = measure("in-process", lambda: servers.make_server_registry(pg.database(), s3.url, bucket),
                          args.users, args.seconds)
        for workers in args.workers:
            workdir = Path(pg.root.parent, f"{pg.root.name}-mlflow-{workers}")
            server = servers.launch_mlflow_server(workdir, owns_workdir=True, workers=workers,
                                                  backend_uri=pg.database(), env=servers.SERVER_POOL).wait()
            launched.append(server)
            results += measure(f"server ×{workers}", lambda s=server: servers.make_server_registry(s.url, s3.url, bucket),
                               args.users, args.seconds)
            server.stop()
        print(f"\n{os.cpu_count()} CPUs; {PUBLISHERS} publishers; {args.users} returning users; "
              f"{TOKENS * WIDTH * 4 // 1024} KiB prefixes; PostgreSQL {'without fsync' if args.no_fsync else 'durable'}")
        print("| backend | path | publishes/s | MLflow requests / publish | S3 requests / publish |")
        print("|---|---|---|---|---|")
        for r in results:
            print(f"| {r.mode} | {r.path} | {r.rate:.1f} | {r.per_publish(r.mlflow_requests):.1f} | "
                  f"{r.per_publish(r.store_requests):.1f} |")
    finally:
        for server in launched:
            server.stop()
        s3.stop()
        pg.stop()


if __name__ == "__main__":
    main()
