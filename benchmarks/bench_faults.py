"""Reliability under faults: vanilla MLflow + boto3 beside ours, through the same fault proxies in
front of the same real servers, in one run.

Starts an `mlflow server` (sqlite, one worker) and an S3-compatible server (moto) on loopback, and
puts a fault proxy (tests/fixtures/faults.py) in front of each: a seeded share of requests gets a
503, a connection reset before the server sees it, or its response lost after the write took
effect.

  vanilla   MlflowClient (its own retries: MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7) and boto3
            with standard retries: create_registered_model, put_object, create_model_version,
            set_registered_model_alias "production", then get_model_version_by_alias + get_object.
  ours      registry.Registry: publish + promote + fetch("production").

For each fault rate it prints users published (the whole sequence succeeded), users left with
more than one version (duplicates), users left without a production alias, and the wall time.

--job then runs a training job on local Ray (tiny GPT-2, trainer actors publishing through the
proxies) four ways: without faults; under 10% faults with retries off (a retry deadline of 1 ms,
what one attempt per operation gives); under 10% faults with ours; and with a 5 s MLflow outage
starting once the first user is published. It prints users published in that job, duplicate
versions, fsck faults (orphans, dangling), users left out of production, and the wall time.

    python benchmarks/bench_faults.py [--users 60] [--rates 0.1 0.2] [--job] [--job-users 16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures: servers and the fault proxy

import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from prefixfleet.registry import NotFound, Registry, UserKey, fsck  # noqa: E402
from prefixfleet.registry.retry import DEADLINE_VAR  # noqa: E402
from tests.fixtures import servers  # noqa: E402
from tests.fixtures.artifacts import make_artifact  # noqa: E402
from tests.fixtures.faults import FaultProxy  # noqa: E402

NAMESPACE = "bench"


@dataclass
class Tally:
    published: int = 0
    duplicates: int = 0
    no_production: int = 0
    seconds: float = 0.0
    first_error: str = ""


def vanilla_run(mlflow_url: str, s3_url: str, direct_mlflow: str, bucket: str, users: list[str]) -> Tally:
    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    s3 = boto3.client("s3", endpoint_url=s3_url, config=Config(retries={"mode": "standard", "max_attempts": 5}))
    tally, started = Tally(), time.perf_counter()
    for user in users:
        name, data = f"vanilla.{user}", make_artifact(NAMESPACE, user)
        try:
            try:
                client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            s3.put_object(Bucket=bucket, Key=f"vanilla/{user}", Body=data)
            mv = client.create_model_version(name, f"s3://{bucket}/vanilla/{user}")
            client.set_registered_model_alias(name, "production", mv.version)
            got = client.get_model_version_by_alias(name, "production")
            assert s3.get_object(Bucket=bucket, Key=got.source.split("/", 3)[3])["Body"].read() == data
            tally.published += 1
        except Exception as exc:  # noqa: BLE001 - counted, the run goes on
            tally.first_error = tally.first_error or f"{type(exc).__name__}: {str(exc)[:120]}"
    tally.seconds = time.perf_counter() - started
    check = MlflowClient(tracking_uri=direct_mlflow, registry_uri=direct_mlflow)
    for user in users:
        name = f"vanilla.{user}"
        versions = check.search_model_versions(f"name = '{name}'")
        tally.duplicates += len(versions) > 1
        try:
            check.get_model_version_by_alias(name, "production")
        except MlflowException:
            tally.no_production += 1
    return tally


def ours_run(reg: Registry, direct: Registry, users: list[str]) -> Tally:
    tally, started = Tally(), time.perf_counter()
    for user in users:
        key, data = UserKey(NAMESPACE, user), make_artifact(NAMESPACE, user)
        try:
            ref = reg.publish(key, data)
            reg.promote(key, ref.version)
            assert reg.fetch(key, "production") == data
            tally.published += 1
        except Exception as exc:  # noqa: BLE001 - counted, the run goes on
            tally.first_error = tally.first_error or f"{type(exc).__name__}: {str(exc)[:120]}"
    tally.seconds = time.perf_counter() - started
    for user in users:
        history = direct.history(UserKey(NAMESPACE, user))
        tally.duplicates += len(history) > 1
        tally.no_production += not any("production" in r.aliases for r in history)
    report = fsck(direct, grace_s=0)
    if report.faults:
        tally.first_error = tally.first_error or f"fsck: {report.faults[0]}"
    return tally


def job_run(name: str, mlflow_url: str, s3_url: str, bucket: str, backbone: str, data: Path, users: int, work: Path, *,
            rate: float = 0.0, deadline: float = 30.0, outage_s: float = 0.0) -> None:
    """One training job through fresh proxies; prints its row."""
    from prefixfleet.pipelines.training.job import JobRequest, run_job
    from prefixfleet.workers.spec import TrainConfig

    os.environ[DEADLINE_VAR] = str(deadline)  # the driver's registry, and forwarded to the actors
    prefix = f"j{uuid.uuid4().hex[:6]}"
    with FaultProxy(mlflow_url, rate=rate, seed=5) as mp, FaultProxy(s3_url, rate=rate, seed=6) as sp, \
            Registry(mp.url, f"s3://{bucket}/{prefix}", s3_endpoint_url=sp.url, model_prefix=prefix) as reg, \
            Registry(mlflow_url, f"s3://{bucket}/{prefix}", s3_endpoint_url=s3_url,
                     model_prefix=prefix) as direct:
        request = JobRequest(str(data), backbone, config=TrainConfig(steps=12), actors=2, pack_size=2,
                             actor_cpus=0.5, progress=False)
        result: dict = {}
        started = time.perf_counter()
        thread = threading.Thread(target=lambda: result.update(summary=_job_or_error(run_job, request, reg, work)))
        thread.start()
        if outage_s:
            while next(direct.list_users("default"), None) is None and thread.is_alive():
                time.sleep(0.05)
            with mp.outage():
                time.sleep(outage_s)
        thread.join()
        seconds = time.perf_counter() - started
        keys = [UserKey("default", f"user-{i:05d}") for i in range(users)]
        histories = [_history(direct, k) for k in keys]
        published = sum(len(h) >= 1 for h in histories)
        duplicates = sum(len(h) > 1 for h in histories)
        out_of_production = sum(not any("production" in r.aliases for r in h) for h in histories)
        faults = len(fsck(direct, grace_s=0).faults)
        summary = result["summary"]
        note = summary if isinstance(summary, str) else f"trained {summary.users['trained']}, failed {summary.users['failed']}"
        print(f"{name:<34} {published:>5}/{users:<4} {duplicates:>10} {faults:>6} {out_of_production:>10} {seconds:8.1f}  "
              f"{mp.faulted}/{sum(mp.counts.values())} / {sp.faulted}/{sum(sp.counts.values())}   {note[:90]}", flush=True)


def _history(direct: Registry, key: UserKey) -> list:
    try:
        return direct.history(key)
    except NotFound:
        return []


def _job_or_error(run_job, request, registry, work):  # noqa: ANN001, ANN202 - a thread's body
    try:
        return run_job(request, registry, work)
    except Exception as exc:  # noqa: BLE001 - printed as the row's note
        return f"{type(exc).__name__}: {exc}"


def job_phase(mlflow_url: str, s3_url: str, bucket: str, users: int, root: Path) -> None:
    from prefixfleet.pipelines.cluster import connect_ray
    from prefixfleet.workers.synthetic import dataset
    from prefixfleet.workers.tiny import build_backbone

    connect_ray()
    backbone = str(build_backbone(root / "backbone", "gpt2", seed=3, hidden=32, layers=2))
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in dataset(users, 12)))
    print(f"\ntraining job, {users} users, 2 trainer actors, packs of 2, 12 steps")
    print(f"{'job':<34} {'published':>10} {'duplicates':>10} {'fsck':>6} {'no prod':>10} {'seconds':>8}  "
          "faults hit (MLflow / S3)")
    job_run("no faults", mlflow_url, s3_url, bucket, backbone, data, users, root)
    job_run("10% faults, retries off", mlflow_url, s3_url, bucket, backbone, data, users, root, rate=0.1, deadline=0.001)
    job_run("10% faults, ours", mlflow_url, s3_url, bucket, backbone, data, users, root, rate=0.1)
    job_run("5 s MLflow outage mid-job, ours", mlflow_url, s3_url, bucket, backbone, data, users, root, outage_s=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--job", action="store_true", help="also run training jobs through the proxies (needs Ray)")
    parser.add_argument("--job-users", type=int, default=16)
    args = parser.parse_args()

    os.environ.update(servers.AWS_TEST_ENV)
    os.environ.update(MLFLOW_DISABLE_TELEMETRY="true")
    root = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    mlflow_srv = servers.launch_mlflow_server(root / "mlflow", template_db=servers.make_template_db(root / "t.db"))
    s3_srv = servers.launch_s3_server(root / "s3")
    try:
        mlflow_srv.wait()
        s3_srv.wait()
        bucket = servers.create_bucket(s3_srv.url, "bench-faults")
        print(f"{os.cpu_count()} CPUs; {args.users} users per run; faults: 503, reset before the server, "
              "response lost after the write, equally likely\n")
        print(f"{'rate':>5} {'client':<8} {'published':>10} {'duplicates':>11} {'no prod':>11} {'seconds':>8}  "
              "faults hit (MLflow / S3)   first error")
        for rate in args.rates:
            for who in ("vanilla", "ours"):
                run = uuid.uuid4().hex[:6]
                users = [f"{who}{run}-{i}" for i in range(args.users)]
                with FaultProxy(mlflow_srv.url, rate=rate, seed=args.seed) as mp, \
                        FaultProxy(s3_srv.url, rate=rate, seed=args.seed + 1) as sp:
                    if who == "vanilla":
                        tally = vanilla_run(mp.url, sp.url, mlflow_srv.url, bucket, users)
                    else:
                        prefix = f"b{run}"
                        with Registry(mp.url, f"s3://{bucket}/{prefix}", s3_endpoint_url=sp.url,
                                      model_prefix=prefix) as reg, \
                                Registry(mlflow_srv.url, f"s3://{bucket}/{prefix}", s3_endpoint_url=s3_srv.url,
                                         model_prefix=prefix) as direct:
                            tally = ours_run(reg, direct, users)
                    hit = f"{mp.faulted}/{sum(mp.counts.values())} / {sp.faulted}/{sum(sp.counts.values())}"
                print(f"{rate:5.2f} {who:<8} {tally.published:>5}/{args.users:<4} {tally.duplicates:>11} "
                      f"{tally.no_production:>11} {tally.seconds:8.1f}  {hit:<26} {tally.first_error}", flush=True)
        if args.job:
            job_phase(mlflow_srv.url, s3_srv.url, bucket, args.job_users, root)
    finally:
        mlflow_srv.stop()
        s3_srv.stop()


if __name__ == "__main__":
    main()
