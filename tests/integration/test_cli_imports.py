"""Registry commands start light: against an `mlflow server` they import no deep-learning stack, no
web framework and no MLflow (the REST client is ours); on the embedded sqlite registry, where
MLflow's SQL store runs in-process, still no torch, transformers or ray."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prefixfleet.registry import Registry, UserKey
from tests.fixtures.artifacts import make_artifact

HEAVY = ("torch", "transformers", "ray", "fastapi", "matplotlib", "mlflow")
LOADED = f"""
import json, sys
from prefixfleet.pipelines.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
COMMANDS = (["get", "zoe", "--json"], ["history", "zoe", "--json"], ["promote", "zoe", "2", "--json"],
            ["rollback", "zoe", "--json"], ["fsck", "--json"], ["forget", "zoe", "--json"])


def run(args: list[str], home) -> dict:
    result = subprocess.run([sys.executable, "-c", LOADED, *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PREFIXFLEET_HOME": str(home)})
    return json.loads(result.stdout.strip().splitlines()[-1])


def publish_two_versions() -> None:
    key = UserKey("default", "zoe")
    with Registry.from_env() as registry:
        for seed in (1, 2):
            registry.promote(key, registry.publish(key, make_artifact("default", "zoe", data_fingerprint=f"d{seed}",
                                                                      seed=seed)).version)


@pytest.mark.servers
def test_registry_commands_against_a_server_load_nothing_heavy(server_env, tmp_path):
    publish_two_versions()
    for args in COMMANDS:
        outcome = run(args, tmp_path)
        assert outcome["code"] in (None, 0) and outcome["loaded"] == [], args


def test_registry_commands_on_the_embedded_registry_load_no_deep_learning_stack(local_env, tmp_path):
    publish_two_versions()
    for args in COMMANDS:
        outcome = run(args, local_env["PREFIXFLEET_HOME"])
        assert outcome["code"] in (None, 0), args
        assert not {"torch", "transformers", "ray"} & set(outcome["loaded"]), args
