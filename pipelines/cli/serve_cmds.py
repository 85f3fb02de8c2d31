"""`serve` (HTTP, in-process or on Ray Serve) and `generate` (one request, no server). torch, the
serving stack and Ray are imported when one of these commands runs, not when the CLI starts."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from prefixfleet.pipelines.cli.app import app
from prefixfleet.pipelines.cli.common import HomeOption, JsonOption, NamespaceOption, emit, fail, needs, open_registry, user_key
from prefixfleet.registry import IntegrityError, Registry, RegistryError, home_dir
from prefixfleet.workers import artifact_format
from prefixfleet.workers.errors import WorkerError

if TYPE_CHECKING:
    from prefixfleet.pipelines.serving import ServeConfig
    from prefixfleet.workers.backbone import Backbone

BackboneOption = Annotated[str | None, typer.Option(
    "--backbone", help="HF model id or local path of the backbone.")]


def _load(name_or_path: str, device: str | None = None) -> Backbone:
    with needs("serve"):
        from prefixfleet.workers.backbone import load_backbone

    try:
        return load_backbone(name_or_path, device=device)
    except (OSError, ValueError, WorkerError) as exc:
        fail(f"cannot load backbone {name_or_path!r}: {exc}")


def _served_backbone(backbone: str | None, home: Path | None) -> str:
    """--backbone, else $PREFIXFLEET_BACKBONE, else the one `prefixfleet demo` built in HOME."""
    chosen = backbone or os.environ.get("PREFIXFLEET_BACKBONE")
    if chosen:
        return chosen
    local = home_dir(home) / "demo" / "backbone"
    if (local / "config.json").is_file():
        return str(local)
    fail("no backbone to serve: pass --backbone ID_OR_PATH (or set PREFIXFLEET_BACKBONE, "
         f"or run `prefixfleet demo`, which builds one in {local})")


@app.command()
def serve(
    backbone: BackboneOption = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    use_ray: Annotated[bool, typer.Option("--ray", help="Deploy on Ray Serve instead of in-process.")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (else RAY_ADDRESS, else local).")] = None,
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas, each with its own backbone.")] = 1,
    device: Annotated[str | None, typer.Option(help="torch device for the backbone (cpu, cuda, …).")] = None,
    max_rows: Annotated[int, typer.Option(min=1, help="Rows decoded together at each step.")] = 32,
    kv_budget: Annotated[int | None, typer.Option(
        min=1, help="Cache positions all running rows may hold (default: max-rows × the context).")] = None,
    home: HomeOption = None,
) -> None:
    """HTTP: POST /v1/generate {"user_id", "namespace"?, "prompt", "max_new_tokens"?}; GET /openapi.json, /healthz."""
    with needs("serve"):
        from prefixfleet.pipelines.serving import InProcessServer, PrefixService, ServeConfig, create_app

    name = _served_backbone(backbone, home)
    config = ServeConfig(max_rows=max_rows, kv_budget=kv_budget)
    registry = open_registry(home)
    if use_ray:
        _serve_on_ray(name, registry, config, host, port, address, replicas, device)
        return
    service = PrefixService(_load(name, device), registry, config)
    typer.echo(f"serving {name} on http://{host}:{port} (POST /v1/generate, GET /openapi.json)", err=True)
    try:
        InProcessServer(create_app(service), host=host, port=port).run()
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised Ctrl-C: a normal stop
        typer.echo("stopped", err=True)
    finally:
        service.close()
        registry.close()


def _serve_on_ray(name: str, registry: Registry, config: ServeConfig, host: str, port: int,
                  address: str | None, replicas: int, device: str | None) -> None:
    with needs("serve"):
        from prefixfleet.pipelines.cluster import actor_env, connect_ray
        from prefixfleet.pipelines.serving import ray_app

    where = registry.address
    registry.close()
    local = connect_ray(address)
    application = ray_app.build(name, where, config, replicas=replicas, num_gpus=1 if (device or "").startswith("cuda") else 0,
                                device=device, env=actor_env(local))
    typer.echo(f"deploying {name} on Ray Serve at http://{host}:{port}", err=True)
    ray_app.run(application, host=host, port=port, blocking=True)


@app.command()
def generate(
    user: Annotated[str, typer.Argument(help="The user (or task) id.")],
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")],
    namespace: NamespaceOption = "default",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate.")] = 32,
    backbone: Annotated[str | None, typer.Option(
        "--backbone", help="Defaults to the backbone recorded with the prefix; its fingerprint must match.")] = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Generate with the user's production prefix, without a server."""
    with needs("serve"):
        from prefixfleet.pipelines.serving import GenerateRequest, PrefixService, ServeConfig

    key = user_key(namespace, user)
    registry = open_registry(home)
    try:
        recorded = artifact_format.read_header(registry.fetch(key)).metadata["backbone"]
        if not (backbone or recorded):
            fail(f"the prefix of {key} records no backbone; pass --backbone ID_OR_PATH")
        service = PrefixService(_load(backbone or recorded), registry, ServeConfig(max_rows=1))
        try:
            request = GenerateRequest(user_id=user, namespace=namespace, prompt=prompt, max_new_tokens=max_new_tokens)
            response = asyncio.run(service.generate(request))
        finally:
            service.close()
    except IntegrityError as exc:
        fail(str(exc), code=3)
    except (RegistryError, WorkerError, ValueError) as exc:
        fail(str(exc))
    finally:
        registry.close()
    emit(response.model_dump() | {"backbone": service.backbone.name_or_path}, as_json, response.text)
