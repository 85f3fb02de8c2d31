"""The registry on the real servers, seen from outside: the `prefixfleet` process configured only
by environment variables, and MLflow's own client reading what the registry wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import boto3
import pytest
from mlflow import MlflowClient

from prefixfleet.registry import Registry, RegistryError, UserKey
from tests.fixtures.artifacts import make_artifact

pytestmark = pytest.mark.servers


def test_cli_process_reads_what_a_publisher_wrote_through_the_environment(server_env, tmp_path):
    key = UserKey("default", "zoe")
    artifact = make_artifact("default", "zoe")
    with Registry.from_env() as reg:
        assert reg.store_uri == server_env["PREFIXFLEET_STORE"]
        reg.promote(key, reg.publish(key, artifact, metrics={"eval_loss": 0.5}).version)
    out = tmp_path / "zoe.safetensors"
    result = subprocess.run([sys.executable, "-m", "prefixfleet.pipelines.cli", "get", "zoe", "--json", "--out", str(out)],
                            capture_output=True, text=True, env={**os.environ, "PREFIXFLEET_HOME": str(tmp_path)},
                            timeout=300)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["uri"].startswith(server_env["PREFIXFLEET_STORE"] + "/default/")
    assert (payload["version"], payload["alias"], payload["metrics"]) == (1, "production", {"eval_loss": 0.5})
    assert out.read_bytes() == artifact
    assert not (tmp_path / "mlflow.db").exists()  # nothing embedded was used


def test_mlflow_and_s3_clients_see_one_model_per_user_with_tagged_versions(make_server_registry, mlflow_server_uri,
                                                                          s3_endpoint):
    reg = make_server_registry()
    key = UserKey("tenant-1", "user/with:odd..chars")
    ref = reg.promote(key, reg.publish(key, make_artifact("tenant-1", "user/with:odd..chars"), run_id="r1").version)
    client = MlflowClient(tracking_uri=mlflow_server_uri)
    mv = client.get_model_version_by_alias(key.model_name(reg.prefix), "production")
    assert (mv.source, mv.tags["prefixfleet.sha256"], mv.tags["prefixfleet.run_id"]) == (ref.uri, ref.sha256, "r1")
    bucket, _, prefix = ref.uri.removeprefix("s3://").partition("/")
    body = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=bucket, Key=prefix)["Body"].read()
    assert body == reg.fetch(key)


def test_a_server_with_a_file_store_is_refused_with_the_fix(mlflow_server_uri, tmp_path):
    with Registry(mlflow_server_uri, tmp_path.as_uri(), model_prefix="tfile") as reg:
        with pytest.raises(RegistryError, match="set PREFIXFLEET_STORE to s3://"):
            reg.publish(UserKey("default", "x"), make_artifact("default", "x"))
