"""Training on a real two-node Ray cluster (`ray start --head` + `ray start --address`, the second
node in its own network namespace), with the registry on the real servers the nodes reach: an
`mlflow server` on PostgreSQL and moto's S3. The job is started both ways users start it —
`prefixfleet train --address` and `ray job submit` — and survives losing the second node mid-job
with every user published exactly once. `prefixfleet serve --ray` puts two half-GPU replicas on
the node that declares one GPU, and refuses a third before deploying."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import pytest
from mlflow import MlflowClient

from prefixfleet.registry import NotFound, Registry, UserKey, VersionRef
from tests.fixtures import servers
from tests.fixtures.backbones import TinyBackbones
from tests.fixtures.cluster import RayCluster
from tests.fixtures.postgres import PostgresServer
from tests.fixtures.servers import free_port
from tests.pipelines.pipeline_support import BACKBONE, synthetic, write_jsonl
from tests.pipelines.serving_support import PROMPTS, each_alone, publish_user

pytestmark = [pytest.mark.ray, pytest.mark.servers, pytest.mark.cluster]
JOB_TIMEOUT_S = 300
TRAINER_CLASS = "UserTrainer"
REPLICA_CLASS = "ServeReplica:prefixfleet:prefixfleet"


@dataclass
class Rig:
    cluster: RayCluster
    mlflow: servers.ServerProcess
    s3: servers.ServerProcess
    bucket: str

    def job_env(self, prefix: str) -> dict[str, str]:
        """The registry of one test (its own model prefix and bucket folder), as the job sees it."""
        return {"MLFLOW_TRACKING_URI": self.mlflow.url, "PREFIXFLEET_STORE": f"s3://{self.bucket}/{prefix}",
                "AWS_ENDPOINT_URL": self.s3.url, "PREFIXFLEET_MODEL_PREFIX": prefix}

    def registry(self, prefix: str) -> Registry:
        return Registry(self.mlflow.url, f"s3://{self.bucket}/{prefix}", s3_endpoint_url=self.s3.url,
                        model_prefix=prefix)

    def driver_env(self, prefix: str) -> dict[str, str]:
        """A driver on this host: its own environment, the cluster's token, the registry's servers."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "PREFIXFLEET_"))}
        return {**base, **servers.AWS_TEST_ENV, **self.cluster.client_env(), **self.job_env(prefix)}


@pytest.fixture(scope="module")
def rig(postgres: PostgresServer) -> Iterator[Rig]:
    """The cluster and the servers on its head's address (127.0.0.1 inside the namespace is not ours)."""
    root = Path(tempfile.mkdtemp(prefix="prefixfleet-cluster-"))
    started: list[servers.ServerProcess | RayCluster] = []
    try:
        cluster = RayCluster.start(node_gpus=1)
        started.append(cluster)
        host = cluster.network.head_ip
        mlflow = servers.launch_mlflow_server(root / "mlflow", owns_workdir=True, backend_uri=postgres.database(),
                                              env=servers.SERVER_POOL, host=host)
        started.append(mlflow)
        s3 = servers.launch_s3_server(root / "s3", owns_workdir=True, host=host)
        started.append(s3)
        mlflow.wait(), s3.wait()
        yield Rig(cluster, mlflow, s3, servers.create_bucket(s3.url, "cluster"))
    finally:
        for thing in reversed(started):
            thing.stop()


def _published(registry: Registry, keys: list[UserKey]) -> dict[UserKey, list[VersionRef]]:
    out = {}
    for key in keys:
        try:
            if history := registry.history(key):
                out[key] = history
        except NotFound:
            pass
    return out


def _check_once_each(registry: Registry, keys: list[UserKey], job_id: str) -> None:
    """Every user published once, by this job, in production, its artifact in the bucket."""
    published = _published(registry, keys)
    s3 = boto3.session.Session().client("s3", endpoint_url=registry.address.s3_endpoint_url, **servers.aws_kwargs())
    for key in keys:
        history = published.get(key, [])
        assert len(history) == 1, f"{key} has {len(history)} versions"
        ref = history[0]
        assert ref.run_id == job_id and "production" in ref.aliases, ref
        bucket, _, path = ref.uri.removeprefix("s3://").partition("/")
        assert s3.list_objects_v2(Bucket=bucket, Prefix=path)["KeyCount"] > 0, ref.uri


def _new_trainers(cluster: RayCluster, before: set[str]) -> list[dict]:
    return [a for a in cluster.actors(TRAINER_CLASS) if a["actor_id"] not in before]


def _keys(users: int) -> list[UserKey]:
    return [UserKey("default", f"user-{i:05d}") for i in range(users)]


def test_ray_job_submit_spreads_trainer_actors_over_both_nodes(
        rig: Rig, tiny_backbones: TinyBackbones, tmp_path: Path) -> None:
    users, prefix = 6, servers.unique_prefix()
    data = write_jsonl(tmp_path / "data.jsonl", synthetic(users))
    before = {a["actor_id"] for a in rig.cluster.actors(TRAINER_CLASS)}
    submission = f"prefixfleet-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", rig.cluster.dashboard,
         "--submission-id", submission, "--runtime-env-json", json.dumps({"env_vars": rig.job_env(prefix)}), "--",
         "prefixfleet", "train", str(data), "--backbone", tiny_backbones.path(**BACKBONE), "--steps", "2",
         "--home", str(tmp_path / "home"), "--per-user-out", str(tmp_path / "per_user.jsonl"), "--json"],
        env=rig.driver_env(prefix), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"Job '{submission}' succeeded" in done.stdout + done.stderr
    rows = [json.loads(line) for line in (tmp_path / "per_user.jsonl").read_text().splitlines()]
    assert sorted(r["user_id"] for r in rows) == [k.user_id for k in _keys(users)]
    assert {r["status"] for r in rows} == {"trained"}

    trainers = _new_trainers(rig.cluster, before)
    assert len(trainers) == 3  # as many as the nodes hold: one 1-CPU actor on the head, two on the second node
    assert {a["node_id"] for a in trainers} == {n["node_id"] for n in rig.cluster.nodes()}
    registry = rig.registry(prefix)
    job_id = registry.history(_keys(users)[0])[0].run_id
    _check_once_each(registry, _keys(users), job_id)
    run = MlflowClient(rig.mlflow.url).get_run(job_id)
    assert run.info.status == "FINISHED" and run.data.params["data"] == str(data)
    assert (run.data.params["actors"], run.data.params["actor_nodes"]) == ("3", "2")
    registry.close()


def test_train_with_address_survives_losing_the_second_node_mid_job(
        rig: Rig, tiny_backbones: TinyBackbones, tmp_path: Path) -> None:
    """One user per pack, so a chunk publishes user by user and the kill is likely to fall inside
    one: the head's actor then finishes the chunk, publishing only the users not published yet."""
    users, prefix = 12, servers.unique_prefix()
    keys = _keys(users)
    data = write_jsonl(tmp_path / "data.jsonl", synthetic(users))
    registry = rig.registry(prefix)
    out, err = (tmp_path / "driver.out").open("w"), (tmp_path / "driver.err").open("w")  # files: a full pipe stalls
    driver = subprocess.Popen(
        [sys.executable, "-m", "prefixfleet.pipelines.cli", "train", str(data),
         "--backbone", tiny_backbones.path(**BACKBONE), "--steps", "60", "--actors", "2", "--pack-size", "1",
         "--address", rig.cluster.address, "--home", str(tmp_path / "home"), "--json"],
        env=rig.driver_env(prefix), stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not _published(registry, keys):
            assert driver.poll() is None, f"the job ended before the kill: {Path(err.name).read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no user was published in time"
            time.sleep(0.2)
        rig.cluster.kill_node()  # the head's actor is left, and the head has no CPU for another
        driver.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
            driver.wait(30)
        out.close(), err.close()
        rig.cluster.start_node()
    log = Path(err.name).read_text()
    assert driver.returncode == 0, log[-3000:]
    assert re.search(r"trainer actor \d lost \(its node \w+ died\); its chunks go to the 1 left", log), log[-3000:]
    summary = json.loads(Path(out.name).read_text())
    assert summary["users"]["trained"] == users and summary["users"]["failed"] == 0
    _check_once_each(registry, keys, summary["job_id"])
    registry.close()


def _serve_shutdown(rig: Rig) -> None:
    """Take the Serve application off the cluster (its replicas hold the second node's CPUs)."""
    subprocess.run([sys.executable, "-c", "import ray; from ray import serve; "
                    f"ray.init(address={rig.cluster.address!r}); serve.shutdown()"],
                   env=rig.driver_env("none"), capture_output=True, timeout=120)


def test_serve_on_the_cluster_shares_the_declared_gpu_between_half_gpu_replicas(
        rig: Rig, tiny_backbones: TinyBackbones, tmp_path: Path, aws_test_env: dict[str, str]) -> None:
    prefix, port, host = servers.unique_prefix(), free_port(), rig.cluster.network.head_ip
    backbone = tiny_backbones.load()  # one whose users' prefixes answer a prompt differently
    registry = rig.registry(prefix)
    users = {f"s{i}": publish_user(registry, backbone, f"s{i}", seed=i)[1] for i in range(3)}
    serve = [sys.executable, "-m", "prefixfleet.pipelines.cli", "serve", "--ray", "--address", rig.cluster.address,
             "--backbone", backbone.name_or_path, "--host", host, "--port", str(port), "--replica-gpus", "0.5",
             "--home", str(tmp_path / "home")]
    refused = subprocess.run([*serve, "--replicas", "3"], env=rig.driver_env(prefix), capture_output=True, text=True,
                             timeout=JOB_TIMEOUT_S)
    assert refused.returncode != 0
    assert "--replicas 3: the Ray cluster's nodes hold 2 replicas of 1 CPU + 0.5 GPU each" in refused.stderr
    err = (tmp_path / "serve.err").open("w")
    server = subprocess.Popen([*serve, "--replicas", "2"], env=rig.driver_env(prefix), stdout=err, stderr=err,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            assert server.poll() is None, Path(err.name).read_text()[-3000:]
            assert time.monotonic() < deadline, "Serve did not answer in time"
            try:
                if httpx.get(f"http://{host}:{port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        jobs = [(user, PROMPTS[i]) for i, user in enumerate(users)]
        texts = [httpx.post(f"http://{host}:{port}/v1/generate", timeout=120,
                            json={"user_id": user, "prompt": prompt, "max_new_tokens": 8}).json()["text"]
                 for user, prompt in jobs]
        assert texts == each_alone(backbone, users, jobs)
        replicas = [a for a in rig.cluster.actors(REPLICA_CLASS) if a["state"] == "ALIVE"]
        gpu_node = next(n["node_id"] for n in rig.cluster.nodes() if n["resources_total"].get("GPU"))
        assert len(replicas) == 2 and {a["node_id"] for a in replicas} == {gpu_node}
        assert all(a["required_resources"].get("GPU") == 0.5 for a in replicas), replicas
    finally:
        os.killpg(server.pid, 9)
        server.wait(30)
        err.close()
        _serve_shutdown(rig)
        registry.close()
