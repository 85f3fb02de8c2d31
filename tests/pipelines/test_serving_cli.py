"""`prefixfleet generate` (backbone from the prefix's record, fingerprint checked) and
`prefixfleet serve` started as a real process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import typer.main
from click.testing import CliRunner, Result

import prefixfleet.pipelines.cli  # noqa: F401 - registers every command on the app
from prefixfleet.pipelines.cli.app import app
from prefixfleet.registry import Registry, UserKey
from prefixfleet.workers.artifact import ArtifactMeta, serialize
from prefixfleet.workers.spec import PrefixSpec
from tests.fixtures.servers import free_port
from tests.pipelines.serving_support import PROMPTS, alone, publish_user, random_prefix

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backbone(tiny_backbones):
    return tiny_backbones.load()


@pytest.fixture
def home_registry(local_env):
    with Registry.from_env() as registry:
        yield registry


def run(*args: str) -> Result:
    return CliRunner().invoke(typer.main.get_group(app), list(args))


def test_generate_uses_the_backbone_recorded_with_the_prefix(home_registry, backbone):
    ref, tensors = publish_user(home_registry, backbone, "ann", seed=1)
    result = run("generate", "ann", "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--json")
    assert result.exit_code == 0, result.stderr
    body = json.loads(result.stdout)
    assert (body["text"], body["version"], body["sha256"]) == (alone(backbone, tensors, PROMPTS[0]), ref.version, ref.sha256)
    assert body["backbone"] == backbone.name_or_path
    plain = run("generate", "ann", "--prompt", PROMPTS[0], "--max-new-tokens", "8")
    assert plain.stdout == body["text"] + "\n"


def test_generate_refuses_a_backbone_whose_fingerprint_differs(home_registry, backbone, tiny_backbones):
    publish_user(home_registry, backbone, "bob", seed=2)
    other = tiny_backbones.load(seed=3)
    result = run("generate", "bob", "--prompt", "hi", "--backbone", other.name_or_path)
    assert result.exit_code == 1
    assert "never used" in result.stderr and "error:" in result.stderr


def test_generate_needs_a_backbone_when_none_is_recorded(home_registry, backbone):
    key = UserKey("default", "cy")
    spec = PrefixSpec(method="ptuning-v2", num_virtual_tokens=5)
    meta = ArtifactMeta(key.namespace, key.user_id, spec, backbone.fingerprint, "d")
    ref = home_registry.publish(key, serialize(random_prefix(backbone, 3, spec), meta))
    home_registry.promote(key, ref.version)
    result = run("generate", "cy", "--prompt", "hi")
    assert result.exit_code == 1 and "pass --backbone" in result.stderr
    assert run("generate", "cy", "--prompt", "hi", "--backbone", backbone.name_or_path).exit_code == 0


def test_generate_for_an_unknown_user_fails_with_one_line(local_env):
    result = run("generate", "nobody", "--prompt", "hi")
    assert result.exit_code == 1
    assert result.stderr == "error: no prefix for user 'nobody' in namespace 'default'\n"


def test_serve_answers_over_http_until_interrupted(home_registry, backbone):
    _, tensors = publish_user(home_registry, backbone, "dee", seed=4)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "prefixfleet.pipelines.cli", "serve", "--backbone", backbone.name_or_path, "--port", str(port)],
        env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        response = httpx.post(f"{url}/v1/generate", json={"user_id": "dee", "prompt": PROMPTS[1], "max_new_tokens": 8},
                              timeout=60)
        assert response.json()["text"] == alone(backbone, tensors, PROMPTS[1])
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    assert process.returncode == 0


def test_serve_without_a_backbone_says_how_to_choose_one(local_env, monkeypatch):
    monkeypatch.delenv("PREFIXFLEET_BACKBONE", raising=False)
    result = run("serve")
    assert result.exit_code == 1 and "pass --backbone" in result.stderr
