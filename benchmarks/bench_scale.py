"""Ingest at scale: read, validate and group N users × R rows, ours beside the path it replaced.

- ours    `pipelines.training.ingest.ingest`: Ray Data read tasks parse and validate the rows, users
          are grouped by hash bucket (`groupby("bucket").map_groups`) into Ray's object store;
          the driver keeps counts and block references.
- before  the in-driver reader the job used until now: every shard through the same row parser
          (`data.read_shard`), users grouped into one dict of Python objects in the driver, and
          each user's data fingerprint computed there (the old plan did it before training).

Each side runs in a fresh process of its own, so the driver's peak RSS (ru_maxrss) is its own;
Ray's worker processes are sampled apart (the largest sum of their RSS seen while it ran).

With --dry-run, the whole command a user types is measured too: `prefixfleet train DATA
--dry-run --json` on an empty embedded registry (ingest, group, and every user planned in the
trainer actors from one bulk read per chunk; a plan line per user to stdout, here a file). Its
driver's RSS and Ray's workers are sampled apart every 0.5 s while it runs.

    python benchmarks/bench_scale.py [--users 20000 100000] [--rows 20] [--files 16] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TEXT = "the quick brown fox jumps over the lazy dog, row {row} of user {user}"


def write_data(folder: Path, users: int, rows: int, files: int) -> int:
    """`users` × `rows` JSONL rows spread over `files` files, a user's rows in several of them."""
    outs = [(folder / f"part-{i:03d}.jsonl").open("w") for i in range(files)]
    size = 0
    for row in range(rows):
        for user in range(users):
            line = json.dumps({"user_id": f"user-{user:07d}", "text": TEXT.format(row=row, user=user)}) + "\n"
            outs[(user + row) % files].write(line)
            size += len(line)
    for out in outs:
        out.close()
    return size


def _ray_workers_rss(stop: threading.Event, peak: list[int]) -> None:
    import psutil

    me = os.getpid()
    while not stop.wait(0.5):
        total = 0
        for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.info["pid"] != me and ("ray::" in cmd or "default_worker.py" in cmd) and proc.info["memory_info"]:
                total += proc.info["memory_info"].rss
        peak[0] = max(peak[0], total)


def dry_run(folder: Path, work: Path, users: int) -> dict:
    """`prefixfleet train FOLDER --dry-run --json` in a fresh home under `work`: wall time, peak
    RSS of the command (sampled) and of Ray's workers, and the users it planned."""
    import psutil

    from prefixfleet.workers.tiny import build_backbone

    backbone = build_backbone(work / "backbone", "gpt2", hidden=16, layers=1)
    out_path = work / "plan.jsonl"
    cmd = [sys.executable, "-m", "prefixfleet.pipelines.cli", "train", str(folder), "--backbone", str(backbone),
           "--home", str(work / "home"), "--dry-run", "--json"]
    started = time.perf_counter()
    with out_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
        me, peak, stop = psutil.Process(proc.pid), [0], threading.Event()
        sampler = threading.Thread(target=_ray_workers_rss, args=(stop, peak), daemon=True)
        sampler.start()
        driver = 0
        while proc.poll() is None:
            try:
                driver = max(driver, me.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.5)
        err = proc.communicate()[1]
        stop.set()
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"train --dry-run failed:\n{err[-3000:]}")
    with out_path.open() as lines:
        planned = sum(1 for line in lines if line.startswith('{"plan": "train"'))
    summary = json.loads(out_path.read_text().splitlines()[-1])
    assert planned == users == summary["users"]["planned"], (planned, summary["users"])
    return {"users": users, "seconds": round(wall, 1), "driver_peak_mb": driver // 2**20,
            "ray_workers_peak_mb": peak[0] // 2**20}


def run_side(side: str, folder: str) -> dict:
    """One side, in this (fresh) process: wall time, users, rows and peak RSS."""
    started = time.perf_counter()
    peak, stop = [0], threading.Event()
    if side == "ours":
        import ray

        from prefixfleet.pipelines.cluster import connect_ray
        from prefixfleet.pipelines.training.ingest import ingest

        connect_ray()
        ray_started = time.perf_counter()
        sampler = threading.Thread(target=_ray_workers_rss, args=(stop, peak), daemon=True)
        sampler.start()
        data = ingest(folder, "default")
        users, rows = data.user_count, data.rows_read
        stop.set()
        elapsed = time.perf_counter() - ray_started
        ray.shutdown()
    else:
        from prefixfleet.pipelines.training.data import BadRow, UserData, read_shard, shards

        grouped: dict = {}
        rows = 0
        for shard in shards(folder):
            for _, row in read_shard(shard, "default"):
                rows += 1
                if not isinstance(row, BadRow):
                    grouped.setdefault(row.key, UserData(row.key)).train.append(row.example)
        fingerprints = [user.fingerprint for user in grouped.values()]
        users = len(fingerprints)
        elapsed = time.perf_counter() - started
    return {"side": side, "users": users, "rows": rows, "seconds": round(elapsed, 1),
            "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "ray_workers_peak_mb": peak[0] // 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--dry-run", action="store_true", help="also time `prefixfleet train --dry-run`")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        logging.disable(logging.WARNING)
        print(json.dumps(run_side(args.side, args.folder)))
        return
    print(f"machine: {platform.machine()}, {multiprocessing.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{args.rows} rows per user in {args.files} JSONL files", flush=True)
    results, dry_runs = [], []
    for users in args.users:
        with tempfile.TemporaryDirectory() as folder:
            size = write_data(Path(folder), users, args.rows, args.files)
            if args.dry_run:
                with tempfile.TemporaryDirectory() as work:
                    dry_runs.append(dry_run(Path(folder), Path(work), users))
                print(json.dumps({"dry_run": dry_runs[-1]}), flush=True)
            for side in ("before", "ours"):
                out = subprocess.run([sys.executable, __file__, "--side", side, "--folder", folder],
                                     capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                assert (result["users"], result["rows"]) == (users, users * args.rows), result
                result["mb"] = size // 2**20
                results.append(result)
                print(json.dumps(result), flush=True)
    print(f"\n{'users':>9} {'rows':>10} {'MB':>6} | {'before s':>9} {'driver MB':>10} | {'ours s':>7} "
          f"{'driver MB':>10} {'Ray workers MB':>15} | {'driver ratio':>12}")
    for before, ours in zip(results[::2], results[1::2], strict=True):
        print(f"{ours['users']:>9,} {ours['rows']:>10,} {ours['mb']:>6} | {before['seconds']:>9} "
              f"{before['driver_peak_mb']:>10} | {ours['seconds']:>7} {ours['driver_peak_mb']:>10} "
              f"{ours['ray_workers_peak_mb']:>15} | {before['driver_peak_mb'] / ours['driver_peak_mb']:>11.1f}×")
    for run in dry_runs:
        print(f"train --dry-run of {run['users']:,} users: {run['seconds']} s, the command's peak "
              f"{run['driver_peak_mb']} MB (Ray's workers {run['ray_workers_peak_mb']} MB)")
    if len(dry_runs) > 1:
        print(f"its peak at {dry_runs[-1]['users']:,} users / at {dry_runs[0]['users']:,}: "
              f"{dry_runs[-1]['driver_peak_mb'] / dry_runs[0]['driver_peak_mb']:.2f}×")
    ours = [r for r in results if r["side"] == "ours"]
    if len(ours) > 1:
        print(f"driver peak at {ours[-1]['users']:,} users / at {ours[0]['users']:,}: "
              f"{ours[-1]['driver_peak_mb'] / ours[0]['driver_peak_mb']:.2f}×")


if __name__ == "__main__":
    main()
