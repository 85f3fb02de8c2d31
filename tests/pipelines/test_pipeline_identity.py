"""What a re-run does with what is already published: changed training settings train again, a
version whose job stopped before its gate gets its gate finished, and a registry written by the
earlier release (no settings recorded) keeps resolving, serving and being skipped."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefixfleet.registry import Registry, UserKey
from prefixfleet.workers.backbone import load_backbone
from prefixfleet.workers.spec import DEFAULT_LR
from tests.fixtures import legacy
from tests.fixtures.backbones import TinyBackbones
from tests.pipelines.pipeline_support import BACKBONE, STEPS, cli, synthetic, write_jsonl

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def backbone(tiny_backbones: TinyBackbones, local_ray: None) -> str:
    return tiny_backbones.path(**BACKBONE)


def train(*args: str) -> dict:
    result = cli("train", *args, "--actors", "1", "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def versions(registry: Registry, user: str) -> list[int]:
    return [v.version for v in registry.history(UserKey("default", user))]


def test_changed_settings_train_again_and_equal_ones_do_not(backbone: str, local_env: dict, tmp_path: Path) -> None:
    data = str(write_jsonl(tmp_path / "data.jsonl", synthetic(2)))
    base = [data, "--backbone", backbone, "--steps", str(STEPS)]
    assert train(*base)["users"]["trained"] == 2
    registry = Registry.from_env()
    first = registry.resolve(UserKey("default", "user-00000"), version=1)
    assert first.settings["steps"] == STEPS and first.settings["lr"] == DEFAULT_LR["prefix"]

    # the default learning rate spelled out is the same setting
    same = train(*base, "--lr", str(DEFAULT_LR["prefix"]))
    assert same["users"] == {"read": 2, "trained": 0, "skipped": 2, "failed": 0, "promoted": 0}
    for version, (flag, value) in enumerate((("--steps", str(STEPS + 2)), ("--batch-size", "4"), ("--lr", "0.02"),
                                               ("--precision", "bfloat16")), 2):
        options = {"--steps": str(STEPS), flag: value}
        summary = train(data, "--backbone", backbone, *(part for item in options.items() for part in item))
        assert summary["users"]["trained"] == 2, flag
        assert versions(registry, "user-00000")[0] == version


def test_a_version_whose_job_stopped_before_its_gate_is_promoted_by_the_next_run(
        backbone: str, local_env: dict, tmp_path: Path) -> None:
    data = str(write_jsonl(tmp_path / "data.jsonl", synthetic(2)))
    first = train(data, "--backbone", backbone, "--steps", str(STEPS))
    assert first["users"]["promoted"] == 2
    registry = Registry.from_env()
    stopped = "pf.default.user-00001"  # as a job that died between publish and promote leaves it
    registry.catalog.delete_alias(stopped, "production")
    registry.catalog.set_model_tag(stopped, "prefixfleet.production_history", "[]")
    registry.invalidate(UserKey("default", "user-00001"))

    again = train(data, "--backbone", backbone, "--steps", str(STEPS))
    assert again["users"] == {"read": 2, "trained": 0, "skipped": 2, "failed": 0, "promoted": 1}
    finished, = again["per_user"]
    assert finished["user_id"] == "user-00001" and finished["promoted"] and finished["version"] == 1
    assert "gate finished" in finished["reason"]
    assert registry.resolve(UserKey("default", "user-00001"), "production").version == 1
    assert versions(registry, "user-00001") == [1]

    third = train(data, "--backbone", backbone, "--steps", str(STEPS))
    assert third["users"]["skipped"] == 2 and third["per_user"] == []


def test_a_registry_written_by_the_earlier_release_resolves_serves_and_is_not_retrained(
        local_env: dict, tiny_backbones: TinyBackbones, local_ray: None) -> None:
    registry = Registry.from_env()
    old = legacy.restore(registry)
    backbone = tiny_backbones.path("gpt2", seed=1)  # the backbone the earlier release trained on
    assert load_backbone(backbone).fingerprint == old.job_params["backbone_fingerprint"]

    ref = registry.resolve(UserKey("default", "user-00000"), "production")
    assert ref.settings == {} and registry.fetch_ref(ref)
    served = cli("generate", "user-00000", "--prompt", "order 2 mug for Jo\n", "--backbone", backbone)
    assert served.exit_code == 0, served.stderr

    settings = ["--steps", old.job_params["config.steps"], "--batch-size", old.job_params["config.batch_size"]]
    rerun = train(str(legacy.DATA), "--backbone", backbone, *settings)
    assert rerun["users"]["trained"] == 0 and rerun["users"]["skipped"] == 3
    # user-00002 was published by a job that stopped before promoting: this run finishes its gate
    assert [(u["user_id"], u["promoted"]) for u in rerun["per_user"]] == [("user-00002", True)]
    for name, sha256 in old.sha256.items():
        user = name.removeprefix("pf.default.")
        assert versions(registry, user) == [1]
        assert registry.resolve(UserKey("default", user), "production").sha256 == sha256

    changed = train(str(legacy.DATA), "--backbone", backbone, *settings[:1], str(int(settings[1]) + 1))
    assert changed["users"]["trained"] == 3
