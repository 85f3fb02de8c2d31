"""Planning a no-change re-run: N users already published and in production, planned again by
`train` and by `retrain` — ours (one bulk read of the published index per chunk of users) beside
the per-user look-ups it replaced (`Planner.decide` without the bulk read: 1–4 MLflow requests per
user). Both sides plan the same chunks in the same process and must reach the same decisions;
MLflow requests are counted at the catalog.

    python benchmarks/bench_plan.py [--users 2000] [--chunk 32] [--tracking-uri URI --store URI]

The registry is filled through the product's publish + promote (so each user has an index). With
no URIs it is the embedded default: sqlite and a file store in a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures: the counting catalog

import numpy as np  # noqa: E402
from safetensors.numpy import save  # noqa: E402

from prefixfleet.pipelines.training.data import UserData  # noqa: E402
from prefixfleet.pipelines.training.plan import JobContext, Planner, Skip  # noqa: E402
from prefixfleet.registry import Registry, UserKey  # noqa: E402
from prefixfleet.workers import artifact_format  # noqa: E402
from prefixfleet.workers.data import Example  # noqa: E402
from prefixfleet.workers.spec import PrefixSpec, TrainConfig  # noqa: E402
from tests.fixtures.counting import CountingCatalog  # noqa: E402

BACKBONE_FP = "bench-backbone"
SPEC, CONFIG = PrefixSpec(), TrainConfig(steps=2)


def users(count: int) -> list[UserData]:
    return [UserData(UserKey("bench", f"user-{i:07d}"), [Example(text=f"row {j} of user {i}") for j in range(4)])
            for i in range(count)]


def artifact(user: UserData) -> bytes:
    meta = artifact_format.metadata(namespace="bench", user_id=user.key.user_id, spec=SPEC.to_json(),
                                    backbone_fingerprint=BACKBONE_FP, data_fingerprint=user.fingerprint,
                                    settings=CONFIG.settings_json(SPEC.method))
    return save({"prompt_embeddings": np.zeros((8, 64), dtype=np.float32)}, metadata=meta)


def fill(registry: Registry, people: list[UserData]) -> float:
    def one(user: UserData) -> None:
        ref = registry.publish(user.key, artifact(user), run_id="bench-fill")
        registry.promote(user.key, ref.version)

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, people))
    return time.perf_counter() - started


def plan(registry: Registry, people: list[UserData], kind: str, chunk: int, bulk: bool) -> dict:
    counting = CountingCatalog(registry.catalog)
    registry.catalog = counting
    planner = Planner(registry, BACKBONE_FP)
    context = JobContext("bench-rerun", kind, "backbone", CONFIG, 8, SPEC)
    started = time.perf_counter()
    decisions = []
    for start in range(0, len(people), chunk):
        part = people[start:start + chunk]
        published = planner.lookup(part) if bulk else {}
        decisions += [planner.decide(u, context, published.get(u.key)) for u in part]
    elapsed = time.perf_counter() - started
    registry.catalog = counting.inner
    skipped = sum(isinstance(d, Skip) for d in decisions)
    return {"wall_s": elapsed, "requests": sum(counting.calls.values()), "skipped": skipped,
            "decisions": [(type(d).__name__, d.reason) for d in decisions], "calls": dict(counting.calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--chunk", type=int, default=32)  # the fleet's largest: 4 packs of 8
    parser.add_argument("--tracking-uri")
    parser.add_argument("--store")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        tracking = args.tracking_uri or f"sqlite:///{home}/mlflow.db"
        registry = Registry(tracking, args.store or (Path(home) / "store").as_uri(), model_prefix="bench")
        people = users(args.users)
        filled = fill(registry, people)
        print(f"# {platform.machine()} {platform.processor() or ''}, registry {tracking.split(':')[0]}; "
              f"filled {args.users} users (publish + promote) in {filled:.1f} s; chunks of {args.chunk}")
        print(f"{'kind':8} {'side':12} {'wall s':>8} {'users/s':>9} {'requests':>9} {'req/user':>9}  calls")
        for kind in ("train", "retrain"):
            before = plan(registry, people, kind, args.chunk, bulk=False)
            ours = plan(registry, people, kind, args.chunk, bulk=True)
            assert ours["decisions"] == before["decisions"] and ours["skipped"] == args.users, "plans differ"
            for side, r in (("per-user", before), ("bulk index", ours)):
                print(f"{kind:8} {side:12} {r['wall_s']:8.2f} {args.users / r['wall_s']:9.0f} {r['requests']:9d} "
                      f"{r['requests'] / args.users:9.3f}  {json.dumps(r['calls'])}")
            print(f"{kind:8} ratio        {before['wall_s'] / ours['wall_s']:8.1f}x faster, "
                  f"{before['requests'] / max(ours['requests'], 1):.0f}x fewer requests")
        registry.close()


if __name__ == "__main__":
    main()
