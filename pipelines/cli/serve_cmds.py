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
    from prefixfleet.pipelines.serving.keys import ApiKeys
    from prefixfleet.workers.backbone import Backbone

BackboneOption = Annotated[str | None, typer.Option(
    "--backbone", help="HF model id or local path of the backbone.")]


def _load(name_or_path: str, device: str | None = None) -> Backbone:
    with needs("serve"):
        from prefixfleet.workers.backbone import load_backbone

    try:
        return load_backbone(name_or_path, device=device, dtype="checkpoint")
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
    replicas: Annotated[int, typer.Option(min=1, help="Ray Serve replicas, each with its own backbone.")] = 1,
    replica_gpus: Annotated[float | None, typer.Option(
        min=0, help="GPUs per Ray Serve replica, fractions allowed (default: 1 with a cuda device, else 0).")] = None,
    device: Annotated[str | None, typer.Option(help="torch device for the backbone (cpu, cuda, …).")] = None,
    keys: Annotated[Path | None, typer.Option(
        "--keys", envvar="PREFIXFLEET_KEYS",
        help="API keys file: 'namespace sha256' lines (make them with `prefixfleet api-key`).")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow a non-loopback address without API keys.")] = False,
    max_rows: Annotated[int, typer.Option(min=1, help="Rows decoded together at each step.")] = 32,
    kv_budget: Annotated[int | None, typer.Option(
        min=1, help="Cache positions all running rows may hold (default: max-rows × the context).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="New tokens one request may ask for.")] = 1024,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt tokens one request may send.")] = 8192,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests waiting in all (more: 429).")] = 256,
    max_queue_per_namespace: Annotated[int, typer.Option(min=1, help="Requests one namespace may have waiting.")] = 64,
    request_timeout: Annotated[float, typer.Option(min=0.001, help="Seconds a request may take (then 504).")] = 600.0,
    home: HomeOption = None,
) -> None:
    """HTTP: OpenAI-compatible /v1/completions, /v1/chat/completions, /v1/models (model = "namespace/user");
    POST /v1/generate; GET /openapi.json, /healthz."""
    with needs("serve"):
        from prefixfleet.pipelines.serving import InProcessServer, PrefixService, ServeConfig, create_app
        from prefixfleet.pipelines.serving.keys import ApiKeys, KeysFileError, is_loopback

    try:
        api_keys = ApiKeys.load(keys) if keys else None
    except KeysFileError as exc:
        fail(str(exc))
    if api_keys is None and not is_loopback(host) and not insecure:
        fail(f"refusing to serve on {host} without API keys: anyone who reaches it could generate with every "
             "tenant's users. Pass --keys FILE, or --insecure to do it anyway.")
    name = _served_backbone(backbone, home)
    if max_queue_per_namespace > max_queue:
        fail(f"--max-queue-per-namespace ({max_queue_per_namespace}) cannot exceed --max-queue ({max_queue})")
    config = ServeConfig(max_rows=max_rows, kv_budget=kv_budget, max_new_tokens=max_new_tokens,
                         max_prompt_tokens=max_prompt_tokens, max_queue=max_queue,
                         max_queue_per_tenant=max_queue_per_namespace, request_timeout_s=request_timeout)
    registry = open_registry(home)
    if use_ray:
        gpus = replica_gpus if replica_gpus is not None else (1.0 if (device or "").startswith("cuda") else 0.0)
        _serve_on_ray(name, registry, config, api_keys, host, port, address, replicas, device, gpus)
        return
    service = PrefixService(_load(name, device), registry, config)
    typer.echo(f"serving {name} on http://{host}:{port} (POST /v1/generate, GET /openapi.json)", err=True)
    try:
        InProcessServer(create_app(service, api_keys), host=host, port=port).run()
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised Ctrl-C: a normal stop
        typer.echo("stopped", err=True)
    finally:
        service.close()
        registry.close()


def _serve_on_ray(name: str, registry: Registry, config: ServeConfig, keys: ApiKeys | None, host: str, port: int,
                  address: str | None, replicas: int, device: str | None, gpus: float) -> None:
    with needs("serve"):
        from prefixfleet.pipelines.cluster import actor_env, connect_ray
        from prefixfleet.pipelines.placement import check_replicas, node_resources
        from prefixfleet.pipelines.serving import ray_app
        from prefixfleet.pipelines.training.errors import JobError

    where = registry.address
    registry.close()
    local = connect_ray(address)
    try:  # a replica no node can hold would wait for resources forever
        check_replicas(node_resources(), replicas, ray_app.REPLICA_CPUS, gpus)
    except JobError as exc:
        fail(str(exc))
    application = ray_app.build(name, where, config, keys=keys, replicas=replicas, num_gpus=gpus, device=device,
                                env=actor_env(local))
    typer.echo(f"deploying {name} on Ray Serve at http://{host}:{port}", err=True)
    ray_app.run(application, host=host, port=port, blocking=True)


@app.command("api-key")
def api_key(
    namespace: Annotated[str, typer.Argument(help="The namespace the key may use.")],
    keys: Annotated[Path, typer.Option("--keys", envvar="PREFIXFLEET_KEYS", help="The keys file to append to.")],
) -> None:
    """Make an API key for NAMESPACE: its hash is appended to the keys file, the key is printed once."""
    from prefixfleet.pipelines.serving.keys import new_key
    from prefixfleet.registry import InvalidUserKey

    try:
        key, line = new_key(namespace)
    except InvalidUserKey as exc:
        fail(str(exc))
    keys.parent.mkdir(parents=True, exist_ok=True)
    with keys.open("a") as out:
        out.write(line + "\n")
    keys.chmod(0o600)
    typer.echo(key)
    typer.echo(f"granted namespace {namespace!r} in {keys}; the key is not stored anywhere: keep it", err=True)


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
