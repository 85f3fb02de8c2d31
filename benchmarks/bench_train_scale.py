"""End-to-end `prefixfleet train` of many users on local Ray with a PostgreSQL-backed registry, ours
beside today's path before "A million users" (commit 3633973: the driver reads every row, plans each
user with its own MLflow look-ups, and each trained user is published in two steps).

Servers: a durable PostgreSQL (Debian's), `mlflow server --workers 2` on a fresh database of it per
run (its access log counts the MLflow requests the job made, actors included), moto S3 for the
prefixes. Backbone: the micro GPT-2 of `workers.tiny`, --steps 2, ROWS rows per user. Each run is
the whole CLI (start-up, Ray, actors, ingest, planning, training, publishing, the job's MLflow run)
in a fresh process; the driver's peak RSS is that process's own (Ray's processes are not in it).

Both paths run on the same --sample users (a like-for-like ratio); ours then runs on all --users.
The older path runs from a `git worktree` of its commit, imported in place of today's package.

    python benchmarks/bench_train_scale.py [--users 20000] [--sample 2000]
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.fixtures, benchmarks.user_rows

from benchmarks.old_commit import old_package, remove_old_package  # noqa: E402
from benchmarks.user_rows import write_jsonl_users  # noqa: E402
from prefixfleet.workers.tiny import build_backbone  # noqa: E402
from tests.fixtures import servers  # noqa: E402
from tests.fixtures.postgres import PostgresServer  # noqa: E402

TODAYS_PATH = "3633973"  # the last commit before ingest moved to Ray Data
STEPS, ROWS = 2, 4
_REQUEST = re.compile(r'"(GET|POST|PATCH|DELETE) /(ajax-)?api/')


def _peak_rss(pid: int, peak: list[int], done: threading.Event) -> None:
    while not done.wait(0.2):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        found = re.search(r"VmHWM:\s+(\d+) kB", status)
        if found:
            peak[0] = max(peak[0], int(found.group(1)))


def run_train(path: str, data: Path, backbone: Path, env: dict[str, str], log: Path) -> dict:
    """One `prefixfleet train --json` over `data`: wall time, driver peak RSS, what the job reports."""
    cmd = [sys.executable, "-m", "prefixfleet.pipelines.cli", "train", str(data), "--backbone", str(backbone),
           "--steps", str(STEPS), "--json"]
    with log.open("w") as err:
        started = time.perf_counter()
        process = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=err, text=True)
        peak, done = [0], threading.Event()
        sampler = threading.Thread(target=_peak_rss, args=(process.pid, peak, done), daemon=True)
        sampler.start()
        out, _ = process.communicate()
        wall = time.perf_counter() - started
        done.set()
    if process.returncode != 0:
        raise SystemExit(f"{path}: train failed ({process.returncode}):\n{log.read_text()[-3000:]}")
    summary = json.loads(out.splitlines()[-1])
    return {"wall_s": wall, "driver_peak_mb": peak[0] // 1024, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--sample", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        backbone = build_backbone(root / "backbone", "gpt2")
        write_jsonl_users(root / "sample", args.sample, ROWS)
        write_jsonl_users(root / "all", args.users, ROWS)
        shim = old_package(root, TODAYS_PATH)
        pg = PostgresServer.launch(durable=True).wait()
        s3 = servers.launch_s3_server(root / "s3").wait()
        bucket = servers.create_bucket(s3.url, "bench")
        print(f"# {platform.machine()}, {os.cpu_count()} CPUs; {STEPS} steps, {ROWS} rows per user", flush=True)
        runs = [("today's path", root / "sample", {"PYTHONPATH": str(shim)}), ("ours", root / "sample", {}),
                ("ours", root / "all", {})]
        results = []
        try:
            for i, (path, data, extra) in enumerate(runs):
                server = servers.launch_mlflow_server(root / f"mlflow-{i}", backend_uri=pg.database(), workers=2,
                                                      env=servers.SERVER_POOL, access_log=True).wait()
                try:
                    env = {"MLFLOW_TRACKING_URI": server.url, "PREFIXFLEET_STORE": f"s3://{bucket}/run{i}",
                           "AWS_ENDPOINT_URL": s3.url, "PREFIXFLEET_HOME": str(root / f"home-{i}"),
                           **servers.AWS_TEST_ENV, **extra}
                    result = run_train(path, data, backbone, env, root / f"train-{i}.log")
                    result["requests"] = sum(1 for line in server.log.read_text(errors="replace").splitlines()
                                             if _REQUEST.search(line))
                finally:
                    server.stop()
                users = args.sample if data.name == "sample" else args.users
                result.update(path=path, users=users, counts=result.pop("summary")["users"])
                results.append(result)
                print(json.dumps(result), flush=True)
        finally:
            s3.stop()
            pg.stop()
            remove_old_package(root)

    print(f"\n{'path':14} {'users':>7} {'wall s':>8} {'users/s':>8} {'driver peak MB':>15} {'MLflow req/user':>16}"
          "  outcomes")
    for r in results:
        print(f"{r['path']:14} {r['users']:7,} {r['wall_s']:8.1f} {r['users'] / r['wall_s']:8.1f} "
              f"{r['driver_peak_mb']:15,} {r['requests'] / r['users']:16.2f}  {r['counts']}")
    old, new = results[0], results[1]
    print(f"at {args.sample:,} users ours is {old['wall_s'] / new['wall_s']:.1f}× faster, "
          f"{old['requests'] / max(1, new['requests']):.1f}× fewer MLflow requests")


if __name__ == "__main__":
    main()
