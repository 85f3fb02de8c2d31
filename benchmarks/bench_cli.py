"""CLI start-up: wall time of `prefixfleet get USER --json`, the query a user types most, beside
`mlflow --help`, alternating in one run.

  server     `get` against a registry behind a real `mlflow server` + moto S3 on loopback: our REST
             client, no MLflow import. Goal: ≤ 0.5× `mlflow --help`.
  embedded   `get` against the sqlite registry under --home, where MLflow's SQL store runs in-process,
             beside importing that store alone. Goal: that import plus ≤ 0.5 s.

    python benchmarks/bench_cli.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures: the server launchers

from prefixfleet.registry import Registry, UserKey  # noqa: E402
from tests.fixtures import servers  # noqa: E402
from tests.fixtures.artifacts import make_artifact  # noqa: E402

BIN = Path(sys.executable).parent
SQL_STORE_IMPORT = [sys.executable, "-c", "import mlflow.store.model_registry.sqlalchemy_store"]


def wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    return time.perf_counter() - start


def publish(registry: Registry) -> None:
    key = UserKey("default", "zoe")
    registry.promote(key, registry.publish(key, make_artifact("default", "zoe")).version)
    registry.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    mlflow_server = servers.launch_mlflow_server(root / "mlflow").wait()
    s3 = servers.launch_s3_server(root / "s3").wait()
    try:
        bucket = servers.create_bucket(s3.url, "bench")
        base = {**os.environ, **servers.AWS_TEST_ENV}
        served = {**base, "MLFLOW_TRACKING_URI": mlflow_server.url, "PREFIXFLEET_STORE": f"s3://{bucket}/cli",
                  "AWS_ENDPOINT_URL": s3.url, "PREFIXFLEET_HOME": str(root / "unused")}
        embedded = {**base, "PREFIXFLEET_HOME": str(root / "home")}
        for name in ("MLFLOW_TRACKING_URI", "PREFIXFLEET_STORE", "AWS_ENDPOINT_URL"):
            embedded.pop(name, None)
        os.environ.update(servers.AWS_TEST_ENV)
        publish(Registry(mlflow_server.url, f"s3://{bucket}/cli", s3_endpoint_url=s3.url))
        publish(Registry.from_env(root / "home"))
        get = [str(BIN / "prefixfleet"), "get", "zoe", "--json"]
        runs = {
            "mlflow --help": ([str(BIN / "mlflow"), "--help"], base),
            "prefixfleet get (server)": (get, served),
            "import MLflow's SQL store": (SQL_STORE_IMPORT, base),
            "prefixfleet get (embedded)": (get, embedded),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for cmd, env in runs.values():  # warm the file cache once
            wall(cmd, env)
        for _ in range(args.rounds):
            for name, (cmd, env) in runs.items():
                times[name].append(wall(cmd, env))
    finally:
        mlflow_server.stop()
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.rounds} alternating rounds; load average {os.getloadavg()[0]:.1f}\n")
    print("| command | median s | min s | max s |\n|---|---:|---:|---:|")
    for name, samples in times.items():
        print(f"| {name} | {median[name]:.2f} | {min(samples):.2f} | {max(samples):.2f} |")
    ratio = median["prefixfleet get (server)"] / median["mlflow --help"]
    extra = median["prefixfleet get (embedded)"] - median["import MLflow's SQL store"]
    print(f"\nserver: get / mlflow --help = {ratio:.2f}x (goal <= 0.5x)")
    print(f"embedded: get - SQL store import = {extra:.2f} s (goal <= 0.5 s)")


if __name__ == "__main__":
    main()
