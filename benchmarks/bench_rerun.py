"""A nightly re-run over users whose data did not change: N users published and in production,
then `prefixfleet train --dry-run` and `retrain --dry-run` over the same data, through the CLI —
ours (ingest on Ray Data, each chunk planned in the trainer actors from one bulk read of the
published index) beside the per-user planning it replaced (`Planner.decide` asking MLflow for
each user, 1–2 requests a user), measured on a sample of the same registry and scaled to N.

Each CLI run is timed whole (start-up, Ray, ingest, planning, report) and must plan every user
`skip`. It runs twice: on the embedded registry (sqlite and a file store, in-process) and through
an `mlflow server` on the same database, whose access log counts the MLflow requests the job made.

The registry is filled by `registry_fill` (the rows a publish + promote writes, in bulk; checked
against a real publish first), with each user's data fingerprint from the read tasks' own parser.

    python benchmarks/bench_rerun.py [--users 100000] [--rows 2] [--anchor-users 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures, benchmarks.registry_fill

from benchmarks.registry_fill import Template, check_equivalent, fill  # noqa: E402
from benchmarks.user_rows import write_jsonl_users  # noqa: E402
from prefixfleet.pipelines.training.plan import JobContext, Planner, Skip  # noqa: E402
from prefixfleet.registry import Registry  # noqa: E402
from prefixfleet.workers.backbone import load_backbone  # noqa: E402
from prefixfleet.workers.spec import PrefixSpec, TrainConfig  # noqa: E402
from prefixfleet.workers.tiny import build_backbone  # noqa: E402
from tests.fixtures.counting import CountingCatalog  # noqa: E402
from tests.fixtures.reading import parse  # noqa: E402
from tests.fixtures.servers import launch_mlflow_server  # noqa: E402

STEPS = 2
SPEC, CONFIG = PrefixSpec(), TrainConfig(steps=STEPS)
_REQUEST = re.compile(r'"(GET|POST|PATCH|DELETE) /(ajax-)?api/')


def cli_rerun(kind: str, data: Path, backbone: Path, env: dict[str, str]) -> dict:
    """One `prefixfleet KIND --dry-run --json` run: wall time and what it planned."""
    cmd = [sys.executable, "-m", "prefixfleet.pipelines.cli", kind, str(data), "--backbone", str(backbone),
           "--steps", str(STEPS), "--dry-run", "--json"]
    started = time.perf_counter()
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"{kind} --dry-run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    *plans, summary = [json.loads(line) for line in out.stdout.splitlines()]
    words: dict[str, int] = {}
    for plan in plans:
        words[plan["plan"]] = words.get(plan["plan"], 0) + 1
    return {"wall_s": wall, "plans": words, "users": summary["users"]}


def per_user_anchor(registry: Registry, users: list, fingerprint: str, kind: str) -> dict:
    """The planning path before the bulk read: `Planner.decide` asking MLflow for each user."""
    counting = CountingCatalog(registry.catalog)
    registry.catalog = counting
    planner = Planner(registry, fingerprint)
    context = JobContext("bench-rerun", kind, "backbone", CONFIG, 8, SPEC)
    started = time.perf_counter()
    decisions = [planner.decide(user, context) for user in users]
    elapsed = time.perf_counter() - started
    registry.catalog = counting.inner
    assert all(isinstance(d, Skip) for d in decisions), [d for d in decisions if not isinstance(d, Skip)][:3]
    return {"wall_s": elapsed, "requests": sum(counting.calls.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--anchor-users", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        home, data = root / "home", root / "data"
        backbone = build_backbone(root / "backbone", "gpt2")
        fingerprint = load_backbone(str(backbone)).fingerprint
        write_jsonl_users(data, args.users, args.rows)
        people = sorted(parse(str(data)).users.values(), key=lambda u: u.key.user_id)
        assert len(people) == args.users
        template = Template(SPEC.to_json(), CONFIG.settings_json(SPEC.method), fingerprint)

        check = Registry(f"sqlite:///{root}/check-a.db", (root / "check-a").as_uri(), model_prefix="pf")
        other = Registry(f"sqlite:///{root}/check-b.db", (root / "check-b").as_uri(), model_prefix="pf")
        check_equivalent(check, other, [(u.key, template.artifact(u.key, u.fingerprint)) for u in people[:3]],
                         "bench-fill")
        check.close()
        other.close()

        registry = Registry.from_env(home)
        started = time.perf_counter()
        fill(registry, ((u.key, template.artifact(u.key, u.fingerprint)) for u in people), "bench-fill")
        filled = time.perf_counter() - started
        print(f"# {platform.machine()}, {os.cpu_count()} CPUs; {args.users:,} users × {args.rows} rows, "
              f"filled in {filled:.0f} s ({args.users / filled:,.0f} users/s)", flush=True)

        sample = people[:: max(1, args.users // args.anchor_users)][: args.anchor_users]
        anchors = {kind: per_user_anchor(registry, sample, fingerprint, kind) for kind in ("train", "retrain")}
        registry.close()

        results = {}
        embedded = {"PREFIXFLEET_HOME": str(home)}
        for kind in ("train", "retrain"):
            results[("embedded", kind)] = cli_rerun(kind, data, backbone, embedded)
            print(json.dumps({"registry": "embedded", "kind": kind, **results[("embedded", kind)]}), flush=True)
        server = launch_mlflow_server(root / "server", backend_uri=f"sqlite:///{home}/mlflow.db", workers=2,
                                      access_log=True).wait()
        try:
            over_http = {"PREFIXFLEET_HOME": str(home), "MLFLOW_TRACKING_URI": server.url,
                         "PREFIXFLEET_STORE": (home / "store").as_uri()}
            for kind in ("train", "retrain"):
                before = _requests(server.log)
                results[("server", kind)] = cli_rerun(kind, data, backbone, over_http)
                results[("server", kind)]["requests"] = _requests(server.log) - before
                print(json.dumps({"registry": "mlflow server", "kind": kind, **results[("server", kind)]}), flush=True)
        finally:
            server.stop()

    print(f"\n{'kind':8} {'registry':14} {'ours s':>8} {'skipped':>9} {'requests':>9} | "
          f"{'per-user s (scaled)':>20} {'requests':>10} | faster")
    for (where, kind), r in results.items():
        anchor = anchors[kind]
        scaled = anchor["wall_s"] * args.users / len(sample)
        requests = round(anchor["requests"] * args.users / len(sample))
        assert r["plans"] == {"skip": args.users}, r["plans"]
        print(f"{kind:8} {where:14} {r['wall_s']:8.1f} {r['plans']['skip']:9,} {r.get('requests', '-'):>9} | "
              f"{scaled:20.0f} {requests:10,} | {scaled / r['wall_s']:5.1f}×")
    print(f"per-user side: {len(sample):,} users planned in-process on the embedded registry, scaled to "
          f"{args.users:,}; ours: the whole CLI run")


def _requests(log: Path) -> int:
    return sum(1 for line in log.read_text(errors="replace").splitlines() if _REQUEST.search(line))


if __name__ == "__main__":
    main()
