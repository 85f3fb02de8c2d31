"""Registry speed: vanilla MLflow beside ours, on the same real servers, in one run.

Starts an `mlflow server` (sqlite, one worker) and an S3-compatible server (moto) on loopback.

  vanilla   MlflowClient: create_registered_model / create_model_version / set_registered_model_alias,
            the artifact uploaded with MLflow's S3 artifact repository; reads are
            get_model_version_by_alias + mlflow.artifacts.download_artifacts.
  ours      registry.Registry: one REST request per registry operation on a pooled keep-alive
            session, boto3 for the bytes, bounded resolution and content caches.

Phases: per-request latency (where MlflowClient's time goes); publish (serial latency, then
sustained throughput); resolve + fetch cold (no cache) and warm; then the same cold lookups after
--users registered users were added by a fast path (rows inserted straight into the server's
sqlite database through MLflow's own table definitions, one registered model + one tagged
version + one alias per user), to show lookups do not slow down as the registry grows.

    python benchmarks/bench_registry.py [--users 100000] [--publish 600] [--lookups 300]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures: the server launchers

import mlflow  # noqa: E402
import requests  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository  # noqa: E402
from requests.adapters import HTTPAdapter  # noqa: E402

from prefixfleet.registry import Registry, UserKey  # noqa: E402
from prefixfleet.registry import refs as tags  # noqa: E402
from tests.fixtures import servers  # noqa: E402
from tests.fixtures.artifacts import make_artifact  # noqa: E402

NAMESPACE = "bench"
PREFIX_BYTES_TOKENS, PREFIX_BYTES_WIDTH = 16, 4096  # 256 KiB float32: a realistic prefix


@dataclass
class Row:
    metric: str
    vanilla: float | None
    ours: float
    unit: str
    goal: str = ""
    met: bool | None = None


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(call: Callable[[], object], n: int) -> list[float]:
    """Milliseconds per call."""
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        call()
        out.append((time.perf_counter_ns() - t) / 1e6)
    return out


def artifact(user: str, seed: int = 0) -> bytes:
    return make_artifact(NAMESPACE, user, seed=seed, tokens=PREFIX_BYTES_TOKENS, width=PREFIX_BYTES_WIDTH)


class Vanilla:
    """What a team would write with MLflow's client alone."""

    def __init__(self, uri: str, bucket: str, workdir: Path) -> None:
        self.client, self.bucket, self.workdir = MlflowClient(tracking_uri=uri, registry_uri=uri), bucket, workdir
        self.users: list[str] = []

    def publish(self, user: str, data: bytes) -> None:
        local = self.workdir / f"{user}.safetensors"
        local.write_bytes(data)
        root = f"s3://{self.bucket}/vanilla/{user}"
        S3ArtifactRepository(root).log_artifact(str(local))
        name = f"vanilla.{user}"
        self.client.create_registered_model(name)
        mv = self.client.create_model_version(name, f"{root}/{local.name}", tags={"sha256": "-"})
        self.client.set_registered_model_alias(name, "candidate", mv.version)
        self.users.append(user)

    def fetch(self, user: str) -> bytes:
        mv = self.client.get_model_version_by_alias(f"vanilla.{user}", "candidate")
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp)).read_bytes()


class _Adapter(HTTPAdapter):
    def __init__(self, socket_options: list[tuple[int, int, int]]) -> None:
        self.socket_options = socket_options
        super().__init__()

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        kwargs["socket_options"] = self.socket_options
        super().init_poolmanager(*args, **kwargs)  # type: ignore[arg-type]


def request_latency(uri: str, reg: Registry, name: str) -> list[Row]:
    """Where MlflowClient's time goes: Nagle + delayed ACK on POSTs without TCP_NODELAY (urllib3 2
    writes headers and body separately), then the server's own cost per request."""
    client = MlflowClient(tracking_uri=uri)
    nagle = requests.Session()
    nagle.mount("http://", _Adapter([]))
    api = f"{uri}/api/2.0/mlflow/"
    tag = {"name": name, "key": "bench", "value": "x"}
    return [
        Row("POST set-tag: socket without TCP_NODELAY vs ours, p50",
            pct(timed(lambda: nagle.post(api + "registered-models/set-tag", json=tag).content, 40), 0.5),
            pct(timed(lambda: reg.catalog.set_model_tag(name, "bench", "x"), 40), 0.5), "ms"),
        Row("set alias: MlflowClient (2 requests) vs ours, p50",
            pct(timed(lambda: client.set_registered_model_alias(name, "bench", 1), 40), 0.5),
            pct(timed(lambda: reg.catalog.set_alias(name, "bench", 1), 40), 0.5), "ms"),
        Row("GET by alias: MlflowClient vs ours, p50",
            pct(timed(lambda: client.get_model_version_by_alias(name, "candidate"), 100), 0.5),
            pct(timed(lambda: reg.catalog.get_version_by_alias(name, "candidate"), 100), 0.5), "ms"),
        Row("GET /health (the server's floor), p50",
            pct(timed(lambda: nagle.get(f"{uri}/health").content, 100), 0.5),
            pct(timed(lambda: reg.catalog.inner.session.get(f"{uri}/health").content, 100), 0.5), "ms"),
    ]


def publish_phase(vanilla: Vanilla, reg: Registry, n_vanilla: int, n_ours: int) -> tuple[list[Row], list[UserKey]]:
    run = uuid.uuid4().hex[:6]
    v_users = [f"v{run}-{i}" for i in range(n_vanilla)]
    v_data = [artifact(u) for u in v_users]
    t = time.perf_counter()
    v_lat = [timed(lambda u=u, d=d: vanilla.publish(u, d), 1)[0] for u, d in zip(v_users[:n_vanilla // 2], v_data, strict=False)]
    v_serial_rate = len(v_lat) / (time.perf_counter() - t)
    rest = list(zip(v_users[n_vanilla // 2:], v_data[n_vanilla // 2:], strict=True))
    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: vanilla.publish(*p), rest))
    v_rate = len(rest) / (time.perf_counter() - t)

    o_keys = [UserKey(NAMESPACE, f"o{run}-{i}") for i in range(n_ours + 20)]
    serial = [(k, artifact(k.user_id)) for k in o_keys[:20]]
    o_lat = [timed(lambda k=k, d=d: reg.publish(k, d, metrics={"eval_loss": 1.0}), 1)[0] for k, d in serial]
    batch = [(k, artifact(k.user_id)) for k in o_keys[20:]]
    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:  # as many threads as the vanilla client gets
        list(pool.map(lambda p: reg.publish(*p, metrics={"eval_loss": 1.0}), batch))
    o_rate = len(batch) / (time.perf_counter() - t)
    rows = [
        Row("publish, one at a time, p50", pct(v_lat, 0.5), pct(o_lat, 0.5), "ms"),
        Row("publish, one at a time", v_serial_rate, 1000 / statistics.mean(o_lat), "prefixes/s"),
        Row("publish, 16 concurrent (sustained)", v_rate, o_rate, "prefixes/s", ">= 100", o_rate >= 100),
    ]
    return rows, o_keys


def lookup_phase(vanilla: Vanilla, reg: Registry, keys: list[UserKey], n: int, label: str) -> list[Row]:
    v_users = vanilla.users
    users, count = v_users, len(v_users)
    v_cold = [timed(lambda u=users[i % count]: vanilla.fetch(u), 1)[0] for i in range(min(n, 150))]

    def cold(key: UserKey) -> bytes:
        reg.invalidate(key)
        return reg.fetch(key, "candidate")

    key_count = len(keys)
    o_cold = [timed(lambda k=keys[i % key_count]: cold(k), 1)[0] for i in range(n)]
    refs = [reg.resolve(k, "candidate") for k in keys[:50]]
    mlflow_part = timed(lambda: reg.catalog.get_version_by_alias(keys[0].model_name(reg.prefix), "candidate"), 100)
    s3_part = [timed(lambda r=r: reg.store.get(r.key.object_key(r.sha256)), 1)[0] for r in refs * 2]
    ok = pct(o_cold, 0.5) <= 10
    return [
        Row(f"resolve+fetch cold{label}, p50", pct(v_cold, 0.5), pct(o_cold, 0.5), "ms", "<= 10", ok),
        Row(f"resolve+fetch cold{label}, p99", pct(v_cold, 0.99), pct(o_cold, 0.99), "ms"),
        Row("  of which MLflow GET by alias, p50", None, pct(mlflow_part, 0.5), "ms"),
        Row("  of which S3 GET of the bytes, p50", None, pct(s3_part, 0.5), "ms"),
    ]


def warm_phase(vanilla: Vanilla, reg: Registry, keys: list[UserKey]) -> list[Row]:
    hot = keys[:100]
    for key in hot:
        reg.fetch(key, "candidate")
    samples: list[float] = []
    for _ in range(50):
        for key in hot:
            t = time.perf_counter_ns()
            reg.fetch(key, "candidate")
            samples.append((time.perf_counter_ns() - t) / 1e6)
    v_users = vanilla.users
    v_warm = [timed(lambda u=v_users[i % 10]: vanilla.fetch(u), 1)[0] for i in range(100)]
    p50, p99 = pct(samples, 0.5), pct(samples, 0.99)
    return [
        Row("resolve+fetch warm (same users again), p50", pct(v_warm, 0.5), p50, "ms", "<= 0.1", p50 <= 0.1),
        Row("resolve+fetch warm (same users again), p99", pct(v_warm, 0.99), p99, "ms", "<= 1", p99 <= 1),
    ]


def bulk_register(db: Path, store_uri: str, prefix: str, count: int) -> float:
    """Insert `count` users (model + tagged version + alias each) with MLflow's table definitions."""
    from mlflow.store.model_registry.dbmodels.models import (
        SqlModelVersion,
        SqlModelVersionTag,
        SqlRegisteredModel,
        SqlRegisteredModelAlias,
    )
    from sqlalchemy import create_engine, insert

    engine = create_engine(f"sqlite:///{db}", connect_args={"timeout": 60})
    now = int(time.time() * 1000)
    run = uuid.uuid4().hex[:6]
    t = time.perf_counter()
    for start in range(0, count, 20_000):
        models, versions, vtags, aliases = [], [], [], []
        for i in range(start, min(count, start + 20_000)):
            key = UserKey(NAMESPACE, f"bulk{run}-{i}")
            name, sha = key.model_name(prefix), f"{i:064x}"
            models.append({"name": name, "creation_time": now, "last_updated_time": now})
            versions.append({"name": name, "version": 1, "creation_time": now, "last_updated_time": now,
                             "current_stage": "None", "source": f"{store_uri}/{key.object_key(sha)}",
                             "status": "READY", "storage_location": f"{store_uri}/{key.object_key(sha)}"})
            vtags += [{"name": name, "version": 1, "key": k, "value": v} for k, v in (
                (tags.SHA256, sha), (tags.SIZE, "1"), (tags.BACKBONE, "b"), (tags.DATA, "d"), (tags.SPEC, "{}"),
                (tags.IDENTITY, sha), (tags.ALIAS_REQUEST, "candidate"))]
            aliases.append({"name": name, "alias": "candidate", "version": 1})
        with engine.begin() as conn:
            for table, rows in ((SqlRegisteredModel, models), (SqlModelVersion, versions),
                                (SqlModelVersionTag, vtags), (SqlRegisteredModelAlias, aliases)):
                conn.execute(insert(table.__table__), rows)
    engine.dispose()
    return time.perf_counter() - t


def print_table(rows: list[Row]) -> None:
    print(f"\n{'metric':<52} {'vanilla':>10} {'ours':>10} {'unit':<11} {'ratio':>8}  goal")
    for r in rows:
        v = f"{r.vanilla:10.3f}" if r.vanilla is not None else f"{'-':>10}"
        if r.vanilla is None or r.ours == 0:
            ratio = "-"
        elif r.unit.endswith("/s"):
            ratio = f"{r.ours / r.vanilla:.1f}x"
        else:
            ratio = f"{r.vanilla / r.ours:.1f}x"
        goal = f"{r.goal} {'met' if r.met else 'MISSED'}" if r.goal else ""
        print(f"{r.metric:<52} {v} {r.ours:10.3f} {r.unit:<11} {ratio:>8}  {goal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000, help="registered users for the scale phase")
    parser.add_argument("--publish", type=int, default=600, help="prefixes our sustained publish writes")
    parser.add_argument("--vanilla-publish", type=int, default=120, help="prefixes vanilla publishes")
    parser.add_argument("--lookups", type=int, default=300, help="cold lookups per measurement")
    args = parser.parse_args()

    os.environ.update(servers.AWS_TEST_ENV)
    os.environ.update(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", MLFLOW_DISABLE_TELEMETRY="true")
    root = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    template = servers.make_template_db(root / "template.db")
    mlflow_srv = servers.launch_mlflow_server(root / "mlflow", template_db=template)
    s3_srv = servers.launch_s3_server(root / "s3")
    try:
        mlflow_srv.wait()
        s3_srv.wait()
        bucket = servers.create_bucket(s3_srv.url, "bench")
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = s3_srv.url  # MLflow's own S3 repository
        print(f"mlflow server {mlflow_srv.url}, S3 {s3_srv.url}; {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}; prefix {len(artifact('x')) // 1024} KiB", flush=True)
        vanilla = Vanilla(mlflow_srv.url, bucket, root)
        reg = Registry(mlflow_srv.url, f"s3://{bucket}/ours", s3_endpoint_url=s3_srv.url, model_prefix="pf")
        rows: list[Row] = []
        publish_rows, keys = publish_phase(vanilla, reg, args.vanilla_publish, args.publish)
        rows += request_latency(mlflow_srv.url, reg, keys[0].model_name(reg.prefix))
        rows += publish_rows
        print_table(rows)
        rows += lookup_phase(vanilla, reg, keys, args.lookups, "")
        rows += warm_phase(vanilla, reg, keys)
        print_table(rows[-6:])
        seconds = bulk_register(mlflow_srv.workdir / "mlflow.db", reg.store_uri, reg.prefix, args.users)
        total = len(keys) + args.vanilla_publish + args.users
        print(f"\nregistered {args.users} more users by the fast path in {seconds:.1f}s ({total} in all)", flush=True)
        rows += lookup_phase(vanilla, reg, keys, args.lookups, f" at {total // 1000}k users")
        print_table(rows)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
        reg.close()
    finally:
        mlflow_srv.stop()
        s3_srv.stop()


if __name__ == "__main__":
    main()
