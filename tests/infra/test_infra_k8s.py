"""infra/k8s: plain objects pass the Kubernetes schemas; the KubeRay objects hold the structure KubeRay needs."""
from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from croniter import croniter

INFRA = Path(__file__).resolve().parents[2] / "infra"
K8S = INFRA / "k8s"
# Oldest Kubernetes we claim (CronJob timeZone is GA since 1.27) and the newest schemas shipped.
KUBE_VERSIONS = ("1.29", kubernetes_validate.latest_version())
FILES = sorted(K8S.glob("*.yaml"))


def _docs() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in FILES for doc in yaml.safe_load_all(path.read_text()) if doc]


DOCS = _docs()
PLAIN = [(name, doc) for name, doc in DOCS if not doc["apiVersion"].startswith("ray.io/")]
RAY = [(name, doc) for name, doc in DOCS if doc["apiVersion"].startswith("ray.io/")]


def _one(kind: str, api_version: str = "ray.io/v1") -> dict[str, Any]:
    found = [doc for _, doc in DOCS if doc["kind"] == kind and doc["apiVersion"] == api_version]
    assert len(found) == 1, f"expected one {api_version} {kind}, found {len(found)}"
    return found[0]


def _cluster_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every RayClusterSpec inside a ray.io object."""
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        yield spec
    job = spec.get("jobTemplate", spec) if doc["kind"] == "RayCronJob" else spec
    if doc["kind"] in ("RayJob", "RayCronJob") and "rayClusterSpec" in job:
        yield job["rayClusterSpec"]


def _pod_templates(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def _containers(cluster: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for _, template in _pod_templates(cluster):
        yield from template["spec"]["containers"]


def _five_field_cron(expr: str) -> croniter:
    assert len(expr.split()) == 5, f"{expr!r}: use the 5-field form"
    return croniter(expr, datetime(2030, 1, 1))


def _job_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def _submit_argv() -> list[str]:
    """The plain CronJob's `ray job submit ...` command line."""
    (container,) = _one("CronJob", "batch/v1")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container["command"] + container.get("args", [])


def _prefixfleet_argv(kind: str) -> list[str]:
    """The `prefixfleet ...` command each scheduled or submitted object runs."""
    if kind == "CronJob":
        argv = _submit_argv()
        return argv[argv.index("--") + 1:]
    return shlex.split(_job_spec(_one(kind))["entrypoint"])


def test_every_file_parses_into_named_objects() -> None:
    assert {path.name for path in FILES} >= {
        "config.yaml", "raycluster.yaml", "rayjob-train.yaml", "raycronjob-retrain.yaml", "cronjob-retrain.yaml"
    }
    for name, doc in DOCS:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), name
    keys = [(doc["kind"], doc["metadata"]["name"]) for _, doc in DOCS]
    assert len(keys) == len(set(keys)), "two objects share kind and name"


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name,doc", PLAIN, ids=[f"{n}:{d['kind']}" for n, d in PLAIN])
def test_plain_objects_match_the_kubernetes_schema(name: str, doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_every_ray_object_defines_a_cluster_or_selects_one() -> None:
    for name, doc in RAY:
        job = doc["spec"].get("jobTemplate", doc["spec"])
        assert list(_cluster_specs(doc)) or "clusterSelector" in job, name
    assert CLUSTERS, "no ray.io object defines a cluster: the pod-template check below would check nothing"


CLUSTERS = [(name, doc) for name, doc in RAY if list(_cluster_specs(doc))]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name,doc", CLUSTERS, ids=[f"{n}:{d['kind']}" for n, d in CLUSTERS])
def test_pod_templates_inside_ray_objects_match_the_kubernetes_schema(
    name: str, doc: dict[str, Any], version: str
) -> None:
    templates = [item for cluster in _cluster_specs(doc) for item in _pod_templates(cluster)]
    assert [group for group, _ in templates][:1] == ["head"] and len(templates) >= 2  # head + a worker group
    for group, template in templates:
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        kubernetes_validate.validate(wrapped, version, strict=True)


def test_a_broken_pod_template_is_caught() -> None:
    template = {"spec": {"containers": [{"name": "x", "image": "y", "resources": {"limit": {}}}]}}
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrapped, KUBE_VERSIONS[0], strict=True)


def test_raycluster_has_a_cpu_head_and_a_gpu_worker_group() -> None:
    cluster = _one("RayCluster")["spec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"].get("num-cpus") == "0", "training must not land on the head"
    for container in head["template"]["spec"]["containers"]:
        for section in ("requests", "limits"):
            assert "nvidia.com/gpu" not in container.get("resources", {}).get(section, {})
    gpu_groups = []
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            resources = container["resources"]
            gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
            if gpus:
                gpu_groups.append(group["groupName"])
                # Kubernetes accepts extended resources only with requests equal to limits.
                assert resources.get("requests", {}).get("nvidia.com/gpu", str(gpus)) == str(gpus)
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    assert cluster["rayVersion"]


def test_every_ray_container_runs_the_image_with_the_shared_settings() -> None:
    config = {doc["kind"]: doc for _, doc in DOCS if doc["kind"] in ("ConfigMap", "Secret")}
    assert {"MLFLOW_TRACKING_URI", "PREFIXFLEET_STORE", "AWS_ENDPOINT_URL"} <= config["ConfigMap"]["data"].keys()
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= config["Secret"]["stringData"].keys()
    assert config["ConfigMap"]["data"]["PREFIXFLEET_STORE"].startswith("s3://")
    service_accounts = {doc["metadata"]["name"] for _, doc in DOCS if doc["kind"] == "ServiceAccount"}
    for _, doc in RAY:
        for cluster in _cluster_specs(doc):
            for _, template in _pod_templates(cluster):
                assert template["spec"]["serviceAccountName"] in service_accounts
            for container in _containers(cluster):
                assert container["image"] == "prefixfleet:latest"
                refs = {(kind, ref["name"]) for source in container["envFrom"] for kind, ref in source.items()}
                assert refs == {
                    ("configMapRef", config["ConfigMap"]["metadata"]["name"]),
                    ("secretRef", config["Secret"]["metadata"]["name"]),
                }


def test_ray_version_matches_the_image() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    image_version = re.search(r"ARG RAY_IMAGE=rayproject/ray:([0-9.]+)-", dockerfile)
    assert image_version, "infra/Dockerfile must name its Ray base image"
    for _, doc in RAY:
        for cluster in _cluster_specs(doc):
            assert cluster["rayVersion"] == image_version.group(1)


COMMANDS = [("RayJob", "train"), ("RayCronJob", "retrain"), ("CronJob", "retrain")]


@pytest.mark.parametrize("kind,command", COMMANDS)
def test_jobs_run_the_cli_against_the_cluster(kind: str, command: str) -> None:
    argv = _prefixfleet_argv(kind)
    assert argv[:2] == ["prefixfleet", command]
    assert argv[2].startswith("s3://") and argv[2].endswith((".jsonl", ".parquet"))
    assert argv[argv.index("--backbone") + 1]
    assert argv[argv.index("--address") + 1] == "auto"


@pytest.mark.parametrize("kind", ["RayJob", "RayCronJob"])
def test_ray_jobs_target_the_prefixfleet_cluster(kind: str) -> None:
    job = _job_spec(_one(kind))
    cluster_name = _one("RayCluster")["metadata"]["name"]
    assert job.get("clusterSelector") == {"ray.io/cluster": cluster_name} or "rayClusterSpec" in job
    assert job.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode")


def test_raycronjob_is_nightly_bounded_and_marked_alpha() -> None:
    cron_job = _one("RayCronJob")
    it = _five_field_cron(cron_job["spec"]["schedule"])
    first, second = it.get_next(datetime), it.get_next(datetime)
    # No concurrencyPolicy in RayCronJob: a run must end before the next fire time.
    assert 0 < cron_job["spec"]["jobTemplate"]["activeDeadlineSeconds"] < (second - first).total_seconds()
    text = (K8S / "raycronjob-retrain.yaml").read_text()
    assert "ALPHA" in text and "RayCronJob=true" in text and "1.6" in text
    readme = (INFRA / "README.md").read_text()
    assert "RayCronJob=true" in readme and "alpha" in readme.lower()


def test_plain_cronjob_submits_retrain_to_the_head_and_never_overlaps() -> None:
    cron_job = _one("CronJob", "batch/v1")
    spec = cron_job["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    _five_field_cron(spec["schedule"])
    job = spec["jobTemplate"]["spec"]
    # A retried pod would submit the Ray job a second time.
    assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    argv = _submit_argv()
    assert argv[:3] == ["ray", "job", "submit"]
    split = argv.index("--")
    address = argv[argv.index("--address", 0, split) + 1]
    cluster = _one("RayCluster")
    (head,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    head_ports = {port["name"]: port["containerPort"] for port in head["ports"]}
    assert address == f"http://{cluster['metadata']['name']}-head-svc:{head_ports['dashboard']}"


def _cli_options(command: str) -> set[str] | None:
    """Option names of a registered `prefixfleet` command, or None while it is not registered."""
    import typer.main

    import prefixfleet.pipelines.cli  # noqa: F401  (imports the command modules, which register on the app)
    from prefixfleet.pipelines.cli.app import app

    names = {info.name or typer.main.get_command_name(info.callback.__name__) for info in app.registered_commands}
    if command not in names:
        return None
    found = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {opt for param in found.params for opt in getattr(param, "opts", [])}


@pytest.mark.parametrize("kind,command", COMMANDS)
def test_job_options_exist_on_the_cli(kind: str, command: str) -> None:
    options = _cli_options(command)
    if options is None:
        pytest.skip(f"`prefixfleet {command}` is not registered in this tree")
    used = {arg for arg in _prefixfleet_argv(kind) if arg.startswith("--")}
    assert used <= options, f"unknown options {sorted(used - options)}"
