"""The Ray Serve deployment for clusters: each replica holds the backbone, a prefix cache and the
same continuous-batching engine and FastAPI app as the in-process server. The batching across users is
ours: Serve's `@serve.batch` never puts two model ids into one batch, and its multiplexing keeps
few models per replica."""
from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from prefixfleet.pipelines.serving.http import create_app
from prefixfleet.pipelines.serving.keys import ApiKeys
from prefixfleet.pipelines.serving.service import PrefixService, ServeConfig
from prefixfleet.registry import RegistryAddress
from prefixfleet.workers.backbone import load_backbone

APP_NAME = "prefixfleet"
REPLICA_CPUS = 1.0


@serve.ingress()
class PrefixFleetReplica:
    def __init__(self, backbone: str, registry: RegistryAddress, config: ServeConfig, keys: ApiKeys | None,
                 device: str | None) -> None:
        self.service = PrefixService(load_backbone(backbone, device=device, dtype="checkpoint"), registry.open(), config)
        self.keys = keys

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service, self.keys)


def build(backbone: str, registry: RegistryAddress, config: ServeConfig | None = None, *,
          keys: ApiKeys | None = None, replicas: int = 1, num_cpus: float = REPLICA_CPUS, num_gpus: float = 0,
          device: str | None = None, env: dict[str, str] | None = None) -> Application:
    """The application to `serve.run`; each replica may take up to 4 × max_rows requests, so that its
    engine has rows waiting whenever a slot frees."""
    config = config or ServeConfig()
    deployment = serve.deployment(
        PrefixFleetReplica, name=APP_NAME, num_replicas=replicas,
        max_ongoing_requests=4 * config.max_rows,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus, "runtime_env": {"env_vars": env or {}}},
    )
    return deployment.bind(backbone, registry, config, keys, device)


def run(app: Application, *, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False) -> None:
    """Start Serve's HTTP proxy on host:port and deploy `app` at `/`."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
