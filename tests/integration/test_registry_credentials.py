"""Per-namespace credentials, enforced by a real S3-compatible server: moto with IAM on, each
namespace an IAM user holding only the identity policy `infra/bucket_policy.py --identity` renders.
A registry opened with namespace A's credentials publishes, fetches and forgets A's users, and
cannot read, write or delete any key of namespace B; whatever it is refused leaves B as it was.

moto evaluates identity policies, not bucket policies, and ignores the `s3:prefix` condition that
scopes listing: the bucket-policy form and the listing scope are checked offline only
(tests/infra/test_infra_bucket_policy.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import requests

from infra.bucket_policy import identity_policy
from prefixfleet.registry import UserKey
from tests.fixtures import servers

pytestmark = pytest.mark.servers
BUCKET, ROOT = "scoped", "fleet"
STORE = f"s3://{BUCKET}/{ROOT}"
ALICE, BOB = UserKey("team-a", "alice"), UserKey("team-b", "bob")


@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, dict[str, str]]]]:
    """A moto server of its own, with the bucket, one IAM user per namespace (and an admin), and
    IAM enforcement switched on once they exist. Yields (endpoint, credentials by name)."""
    server = servers.launch_s3_server(tmp_path_factory.mktemp("iam-s3"), owns_workdir=True).wait()
    try:
        setup = {"endpoint_url": server.url, **servers.aws_kwargs()}
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **setup)
        policies = {ns: identity_policy(STORE, ns) for ns in ("team-a", "team-b")}
        policies["admin"] = {"Version": "2012-10-17",
                             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        creds = {}
        for name, policy in policies.items():
            iam.create_user(UserName=name)
            iam.put_user_policy(UserName=name, PolicyName="prefixfleet", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=name)["AccessKey"]
            creds[name] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        requests.post(f"{server.url}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        yield server.url, creds
    finally:
        server.stop()


class Scoped:
    """A registry process holding one namespace's credentials, driven operation by operation."""

    def __init__(self, endpoint: str, creds: dict[str, str], tracking_uri: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # its own credentials only
        env.update(creds, AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint, PREFIXFLEET_STORE=STORE,
                   MLFLOW_TRACKING_URI=tracking_uri, PREFIXFLEET_RETRY_DEADLINE_S="5")
        self.process = subprocess.Popen([sys.executable, "-m", "tests.fixtures.scoped_registry"], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, *op: str) -> dict:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(op) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def admin_keys(endpoint: str, creds: dict[str, str], namespace: str) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{ROOT}/{namespace}/").get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


def test_a_namespace_s_credentials_reach_its_own_keys_and_none_of_another_s(iam_s3, mlflow_db_template: Path,
                                                                            tmp_path: Path) -> None:
    endpoint, creds = iam_s3
    db = tmp_path / "mlflow.db"
    db.write_bytes(mlflow_db_template.read_bytes())
    a, b = (Scoped(endpoint, creds[ns], f"sqlite:///{db}") for ns in ("team-a", "team-b"))
    try:
        assert b("publish", BOB.namespace, BOB.user_id) == {"ok": True, "value": 1}
        assert a("publish", ALICE.namespace, ALICE.user_id) == {"ok": True, "value": 1}
        assert a("fetch", ALICE.namespace, ALICE.user_id)["ok"]
        before = admin_keys(endpoint, creds["admin"], "team-b")
        bob_object, = [k.removeprefix(f"{ROOT}/") for k in before if k.endswith(".safetensors")]

        refused = [a("fetch", BOB.namespace, BOB.user_id), a("get", bob_object), a("delete", bob_object),
                   a("delete_prefix", BOB.object_dir),  # the listing passes on moto, each delete is refused
                   a("put", f"team-b/00/mallory/{'0' * 64}.safetensors"),
                   a("publish", BOB.namespace, "mallory"), a("forget", BOB.namespace, BOB.user_id)]
        for result in refused:
            assert result["ok"] is False and result["error"] == "Forbidden", result
            assert "AccessDenied" in result["message"] and "team-b" in result["message"], result
        assert admin_keys(endpoint, creds["admin"], "team-b") == before
        assert b("fetch", BOB.namespace, BOB.user_id)["ok"]

        assert a("forget", ALICE.namespace, ALICE.user_id) == {"ok": True, "value": [1]}
        left = admin_keys(endpoint, creds["admin"], "team-a")
        assert all("/_erasure/" in k for k in left) and not any("alice" in k for k in left)
    finally:
        a.close()
        b.close()
