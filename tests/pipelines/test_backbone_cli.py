"""`prefixfleet init-backbone`, and the PEFT round-trip through the registry: `export` writes an
adapter that peft loads with our logits; `import` publishes an adapter made elsewhere."""
from __future__ import annotations

import json

import torch
from peft import PeftModel
from typer.testing import CliRunner

from prefixfleet.pipelines.cli import app
from prefixfleet.registry import Registry, UserKey
from prefixfleet.workers.artifact import ArtifactMeta, deserialize, serialize
from prefixfleet.workers.backbone import load_backbone
from prefixfleet.workers.data import Example, collate, data_fingerprint, encode
from prefixfleet.workers.forward import logits
from prefixfleet.workers.spec import PrefixSpec, TrainConfig
from prefixfleet.workers.synthetic import user_rows
from prefixfleet.workers.trainer import UserRequest, train_user
from tests.fixtures.peft_logits import peft_logits


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_init_backbone_writes_a_loadable_model(tmp_path):
    result = run("init-backbone", str(tmp_path / "bb"), "--family", "llama", "--seed", "3")
    assert result.exit_code == 0, result.output
    backbone = load_backbone(str(tmp_path / "bb"))
    assert backbone.family.name == "llama" and backbone.stacks["decoder"].kv_heads == 2
    assert run("init-backbone", str(tmp_path / "x"), "--family", "bert").exit_code == 1


def test_export_then_import_round_trips_through_peft(local_env, tmp_path):
    assert run("init-backbone", str(tmp_path / "bb")).exit_code == 0
    backbone = load_backbone(str(tmp_path / "bb"))
    examples = [Example(prompt=r["prompt"], completion=r["completion"]) for r in user_rows(2, 12)]
    spec = PrefixSpec(method="prefix", num_virtual_tokens=4, reparam_hidden=32)
    trained = train_user(backbone, UserRequest("alice", examples, spec, TrainConfig(steps=5)))
    meta = ArtifactMeta("default", "alice", spec, backbone.fingerprint, data_fingerprint(examples),
                        backbone=str(tmp_path / "bb"))
    with Registry.from_env() as registry:
        ref = registry.publish(UserKey("default", "alice"), serialize(trained.tensors, meta))
        registry.promote(UserKey("default", "alice"), ref.version)

    exported = run("export", "alice", "--format", "peft", "--out", str(tmp_path / "adapter"), "--json")
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["sha256"] == ref.sha256
    peft_model = PeftModel.from_pretrained(load_backbone(str(tmp_path / "bb")).model, str(tmp_path / "adapter"))
    batch = collate(backbone, encode(backbone, examples[:2], user="alice", limit=64))
    with torch.no_grad():
        ours = logits(backbone, batch, {k: v.expand(2, *v.shape) for k, v in trained.tensors.items()})
    theirs = peft_logits(peft_model, batch)
    mask = batch.attention_mask.bool()
    assert torch.allclose(ours[mask], theirs[mask], atol=1e-5)

    imported = run("import", str(tmp_path / "adapter"), "--user", "bob", "--promote", "--json")
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["user_id"] == "bob"
    with Registry.from_env() as registry:
        tensors, bob = deserialize(registry.fetch(UserKey("default", "bob")), backbone_fingerprint=backbone.fingerprint)
    assert (bob.namespace, bob.user_id, bob.spec.method) == ("default", "bob", "ptuning-v2")
    assert torch.allclose(tensors["decoder"], trained.tensors["decoder"])


def test_export_refuses_unknown_format_and_unknown_user(local_env, tmp_path):
    assert run("export", "alice", "--format", "onnx", "--out", str(tmp_path)).exit_code == 1
    missing = run("export", "nobody", "--out", str(tmp_path / "a"))
    assert missing.exit_code == 1 and "nobody" in missing.stderr
    not_adapter = run("import", str(tmp_path), "--user", "x")
    assert not_adapter.exit_code == 1 and "not a PEFT adapter" in not_adapter.stderr
