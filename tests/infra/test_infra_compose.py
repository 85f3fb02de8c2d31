"""infra/compose.yaml: the local stack's services, health ordering, ports and settings agree with each other."""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]


def _flag(command: list[str], name: str) -> str:
    """Value of `--name=value` or `--name value` in an argv list."""
    for index, arg in enumerate(command):
        if arg == name:
            return command[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {command}")


def _published(service: dict[str, Any]) -> set[int]:
    return {int(str(port).split(":")[-1]) for port in service.get("ports", [])}


def _bucket(services: dict[str, dict[str, Any]]) -> str:
    target = services["create-bucket"]["command"][-1]
    alias, bucket = target.split("/", 1)
    assert alias == "local"
    return bucket


def test_the_stack_has_its_five_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"minio", "create-bucket", "postgres", "mlflow", "ray-head"}
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for key, value in service.get("environment", {}).items():
            assert isinstance(value, str), f"{name}: {key} must be a string, not {type(value).__name__}"


def test_long_running_services_have_healthchecks_and_start_in_order(services: dict[str, dict[str, Any]]) -> None:
    for name in ("minio", "postgres", "mlflow", "ray-head"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    assert services["create-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["create-bucket"]["restart"] == "no"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    assert services["ray-head"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_ports_reach_the_host(services: dict[str, dict[str, Any]]) -> None:
    assert _published(services["minio"]) >= {9000, 9001}
    assert _published(services["mlflow"]) >= {5000}
    assert _published(services["ray-head"]) >= {8265, 10001}
    assert _flag(services["mlflow"]["command"], "--port") == "5000"


def test_mlflow_keeps_runs_in_postgres_and_artifacts_in_the_bucket(services: dict[str, dict[str, Any]]) -> None:
    mlflow, postgres = services["mlflow"], services["postgres"]["environment"]
    backend = urlsplit(_flag(mlflow["command"], "--backend-store-uri"))
    assert backend.scheme.startswith("postgresql")
    assert (backend.username, backend.password) == (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"])
    assert (backend.hostname, backend.port) == ("postgres", 5432)
    assert backend.path.lstrip("/") == postgres["POSTGRES_DB"]
    artifacts = urlsplit(_flag(mlflow["command"], "--artifacts-destination"))
    assert (artifacts.scheme, artifacts.netloc) == ("s3", _bucket(services))
    assert urlsplit(mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    assert "mlflow:5000" in mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")


def test_mlflow_s_database_pool_holds_what_16_publishers_keep_in_flight(services: dict[str, dict[str, Any]]) -> None:
    env = services["mlflow"]["environment"]
    assert int(env["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"]) + int(env["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"]) >= 32


def test_ray_head_points_prefixfleet_at_the_stack(services: dict[str, dict[str, Any]]) -> None:
    env = services["ray-head"]["environment"]
    tracking = urlsplit(env["MLFLOW_TRACKING_URI"])
    assert (tracking.hostname, str(tracking.port)) == ("mlflow", _flag(services["mlflow"]["command"], "--port"))
    store = urlsplit(env["PREFIXFLEET_STORE"])
    assert (store.scheme, store.netloc) == ("s3", _bucket(services)) and store.path.strip("/")
    endpoint = urlsplit(env["AWS_ENDPOINT_URL"])
    assert (endpoint.hostname, endpoint.port) == ("minio", 9000)
    assert "--head" in services["ray-head"]["command"]


def test_s3_credentials_match_minio(services: dict[str, dict[str, Any]]) -> None:
    root = services["minio"]["environment"]
    credentials = (root["MINIO_ROOT_USER"], root["MINIO_ROOT_PASSWORD"])
    for name in ("mlflow", "ray-head"):
        env = services[name]["environment"]
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == credentials, name
    mc_host = urlsplit(services["create-bucket"]["environment"]["MC_HOST_local"])
    assert (mc_host.username, mc_host.password) == credentials
    assert (mc_host.hostname, mc_host.port) == ("minio", 9000)


def test_build_contexts_and_dockerfiles_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" in service:
            context = (INFRA / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
