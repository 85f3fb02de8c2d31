"""Tenant keys over real HTTP with the `openai` client: a key sees only its namespace, another
tenant's users look exactly like users that do not exist, keys are stored hashed, and the CLI
refuses to expose a keyless server beyond loopback."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import typer.main
from click.testing import CliRunner

import prefixfleet.pipelines.cli  # noqa: F401 - registers every command on the app
from prefixfleet.pipelines.cli.app import app
from prefixfleet.pipelines.serving import InProcessServer, PrefixService, create_app
from prefixfleet.pipelines.serving.keys import ApiKeys, KeysFileError
from prefixfleet.registry import Registry
from tests.fixtures.servers import make_local_registry
from tests.pipelines.serving_support import NEW_TOKENS, PROMPTS, alone, publish_all

pytestmark = pytest.mark.usefixtures("one_torch_thread")

USERS = [("acme", "alice"), ("acme", "bob"), ("beta", "carol")]


def cli(*args: str):
    return CliRunner().invoke(typer.main.get_group(app), list(args))


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A keys file made by `prefixfleet api-key`, and the key printed for each namespace."""
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    printed = {}
    for namespace in ("acme", "beta"):
        result = cli("api-key", namespace, "--keys", str(path))
        assert result.exit_code == 0, result.output
        printed[namespace] = result.stdout.strip()
    return path, printed


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mlflow_db_template) -> Iterator[Registry]:
    with make_local_registry(tmp_path_factory.mktemp("home"), mlflow_db_template) as reg:
        yield reg


@pytest.fixture(scope="module")
def published(registry, backbone) -> dict[str, dict]:
    return publish_all(registry, backbone, USERS)


@pytest.fixture(scope="module")
def url(backbone, registry, published, keys_file) -> Iterator[str]:
    service = PrefixService(backbone, registry)
    try:
        with InProcessServer(create_app(service, ApiKeys.load(keys_file[0])), port=0) as base:
            yield base
    finally:
        service.close()


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def complete(url: str, key: str, model: str) -> str:
    answer = client(url, key).completions.create(model=model, prompt=PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0)
    return answer.choices[0].text


def refusal(url: str, key: str, model: str) -> tuple[type, str]:
    with pytest.raises(openai.APIStatusError) as raised:
        complete(url, key, model)
    return type(raised.value), raised.value.body["message"]


def test_keys_are_stored_hashed(keys_file):
    path, printed = keys_file
    text = path.read_text()
    assert all(key not in text for key in printed.values())
    assert [line.split()[0] for line in text.splitlines()] == ["acme", "beta"]


def test_a_key_serves_its_own_namespace_and_a_bare_user_is_in_it(url, keys_file, backbone, published):
    acme = keys_file[1]["acme"]
    expected = alone(backbone, published["acme/alice"], PROMPTS[0])
    assert complete(url, acme, "acme/alice") == expected
    assert complete(url, acme, "alice") == expected


def test_another_tenant_s_user_is_the_same_404_as_a_user_that_does_not_exist(url, keys_file):
    acme = keys_file[1]["acme"]
    theirs = refusal(url, acme, "beta/carol")
    nobody = refusal(url, acme, "beta/nobody")
    assert theirs[0] is nobody[0] is openai.NotFoundError
    assert theirs[1].replace("carol", "X") == nobody[1].replace("nobody", "X")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {acme}"}) as http:
        answers = [http.post("/v1/generate", json={"user_id": user, "namespace": "beta", "prompt": "hi"})
                   for user in ("carol", "nobody")]
    assert [a.status_code for a in answers] == [404, 404]
    assert answers[0].json()["detail"].replace("carol", "X") == answers[1].json()["detail"].replace("nobody", "X")


def test_models_lists_only_the_key_s_namespace(url, keys_file):
    assert sorted(m.id for m in client(url, keys_file[1]["acme"]).models.list()) == ["acme/alice", "acme/bob"]
    assert [m.id for m in client(url, keys_file[1]["beta"]).models.list()] == ["beta/carol"]


@pytest.mark.parametrize("key", ["", "pf-not-a-key"])
def test_without_a_valid_key_every_route_is_401_and_health_says_only_ok(url, key):
    assert refusal(url, key or "x", "acme/alice")[0] is openai.AuthenticationError
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url, headers=headers) as http:
        assert http.post("/v1/generate", json={"user_id": "alice", "prompt": "hi"}).status_code == 401
        assert http.get("/v1/models").status_code == 401
        assert http.get("/metrics").status_code == 401
        assert http.get("/healthz").json() == {"status": "ok"}


def test_health_tells_a_key_holder_more(url, keys_file, backbone):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys_file[1]['beta']}"}) as http:
        assert http.get("/healthz").json()["backbone_fingerprint"] == backbone.fingerprint


def test_a_bad_keys_file_is_named_by_line(tmp_path):
    bad = tmp_path / "keys.txt"
    bad.write_text("# tenants\nacme 0123\n")
    with pytest.raises(KeysFileError, match=r"keys.txt:2: expected 'namespace sha256-hex'"):
        ApiKeys.load(bad)


def test_serve_refuses_a_non_loopback_address_without_keys(tmp_path):
    result = cli("serve", "--host", "0.0.0.0", "--home", str(tmp_path))
    assert result.exit_code == 1
    assert "refusing to serve on 0.0.0.0 without API keys" in result.output
