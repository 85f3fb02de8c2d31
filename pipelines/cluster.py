"""The Ray cluster to use, and what its trainer actors need from this environment."""
from __future__ import annotations

import logging
import os

from prefixfleet.registry.retry import DEADLINE_VAR

LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2  # prefixes and examples are small; leave memory to training

# Variables a trainer actor needs to reach the registry's servers. On local Ray they are forwarded
# (the raylet may have started before they were set); on a cluster only the non-secret ones are:
# credentials there come from the cluster's own environment (IAM role, Kubernetes secret).
ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", DEADLINE_VAR)
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
               "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def connect_ray(address: str | None = None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start Ray on this machine.

    Returns True when every node of the cluster is this machine (Ray started here, or a cluster
    of this machine alone). An already initialized Ray (a test session, a driver started by
    `ray job submit`) is used as it is.
    """
    import ray  # here, not at the top: commands that never touch Ray start without it

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return only_this_machine()
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return only_this_machine()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
             logging_level=logging.WARNING)
    return True


def actor_env(local: bool) -> dict[str, str]:
    """Environment variables to hand to trainer actors (set before they import anything)."""
    names = ENDPOINT_VARS + (SECRET_VARS if local else ())
    return {"HF_HUB_DISABLE_PROGRESS_BARS": "1", **{n: os.environ[n] for n in names if os.environ.get(n)}}


def only_this_machine() -> bool:
    """Whether every live node of the connected Ray cluster is this machine."""
    import ray

    here = {ray.util.get_node_ip_address(), "127.0.0.1"}
    return all(node["NodeManagerAddress"] in here for node in ray.nodes() if node["Alive"])
