"""`init-backbone`, and the PEFT round-trip: `export` a user's prefix, `import` an adapter."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import typer

from prefixfleet.pipelines.cli.app import app
from prefixfleet.pipelines.cli.common import (
    HomeOption,
    JsonOption,
    NamespaceOption,
    emit,
    fail,
    needs,
    registry_session,
    user_key,
)
from prefixfleet.workers import artifact_format
from prefixfleet.workers.errors import WorkerError

TINY_TYPES = "gpt2 | llama | mistral | qwen2 | qwen3 | mixtral | phi3 | gpt_neox | opt | gemma2 | gemma3 | t5 | bart"
FamilyOpt = Annotated[str, typer.Option(help=TINY_TYPES)]


@app.command("init-backbone")
def init_backbone(
    directory: Annotated[Path, typer.Argument(help="Where to write the model and tokenizer.")],
    family: FamilyOpt = "gpt2",
    seed: Annotated[int, typer.Option(help="Seed of the random init.")] = 0,
) -> None:
    """Build a small random-init backbone + byte-level tokenizer (save_pretrained layout)."""
    with needs("train"):
        from prefixfleet.workers.tiny import build_backbone

    try:
        path = build_backbone(directory, family, seed=seed)
    except WorkerError as exc:
        fail(str(exc))
    typer.echo(str(path))


@app.command("export")
def export(
    user: Annotated[str, typer.Argument(help="The user whose prefix to export.")],
    out: Annotated[Path, typer.Option("--out", help="Adapter directory to write.")],
    fmt: Annotated[str, typer.Option("--format", help="Only `peft` for now.")] = "peft",
    namespace: NamespaceOption = "default",
    alias: Annotated[str, typer.Option(help="Which version: an alias.")] = "production",
    backbone: Annotated[str | None, typer.Option(help="Defaults to the one recorded with the prefix.")] = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a user's prefix as a PEFT adapter directory (PeftModel.from_pretrained loads it)."""
    with needs("train"):
        from prefixfleet.workers.artifact import deserialize
        from prefixfleet.workers.backbone import load_backbone
        from prefixfleet.workers.peft_interop import export_peft

    if fmt != "peft":
        fail(f"unknown format {fmt!r}; only 'peft' is supported")
    key = user_key(namespace, user)
    with registry_session(home) as registry:
        data = registry.fetch(key, alias)
    source = backbone or artifact_format.read_header(data).metadata["backbone"]
    if not source:
        fail(f"the prefix of {namespace}/{user} records no backbone; pass --backbone")
    try:
        model = load_backbone(source)
        tensors, meta = deserialize(data, backbone_fingerprint=model.fingerprint)
        export_peft(model, tensors, meta.spec, out)
    except (WorkerError, OSError) as exc:
        fail(str(exc))
    emit({"namespace": namespace, "user_id": user, "out": str(out), "format": fmt,
          "sha256": hashlib.sha256(data).hexdigest()}, as_json, f"wrote {out}")


@app.command("import")
def import_(
    directory: Annotated[Path, typer.Argument(help="A PEFT prefix- or prompt-tuning adapter directory.")],
    user: Annotated[str, typer.Option("--user", help="The user it belongs to.")],
    namespace: NamespaceOption = "default",
    backbone: Annotated[str | None, typer.Option(help="Defaults to the adapter's base_model_name_or_path.")] = None,
    promote: Annotated[bool, typer.Option(help="Also make it the production version.")] = False,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Publish a PEFT adapter made elsewhere as the user's prefix (alias `candidate`)."""
    with needs("train"):
        from prefixfleet.workers.artifact import ArtifactMeta, serialize
        from prefixfleet.workers.backbone import load_backbone
        from prefixfleet.workers.peft_interop import WEIGHTS_FILE, import_peft, read_peft_config

    try:
        base = backbone or read_peft_config(directory).get("base_model_name_or_path")
        if not base:
            fail("the adapter names no base_model_name_or_path; pass --backbone")
        model = load_backbone(base)
        tensors, spec = import_peft(model, directory)
    except (WorkerError, OSError, json.JSONDecodeError) as exc:
        fail(str(exc))
    key = user_key(namespace, user)
    weights_digest = hashlib.sha256((Path(directory) / WEIGHTS_FILE).read_bytes()).hexdigest()
    meta = ArtifactMeta(namespace, user, spec, model.fingerprint, f"peft:{weights_digest}", backbone=str(base))
    with registry_session(home) as registry:
        ref = registry.publish(key, serialize(tensors, meta), tags={"source": "peft-import"})
        if promote:
            ref = registry.promote(key, ref.version)
    emit(ref.to_json(), as_json, f"published {namespace}/{user} version {ref.version}")
