"""The in-process HTTP server over real HTTP on loopback: concurrent users each get exactly their
single-user generation, a promote is served once noticed, and errors have clear statuses."""
from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from prefixfleet.pipelines.serving import InProcessServer, PrefixService, ServeConfig, create_app
from prefixfleet.registry import Registry
from tests.fixtures.servers import make_local_registry
from tests.pipelines.serving_support import NEW_TOKENS, PROMPTS, alone, publish_user

pytestmark = pytest.mark.usefixtures("one_torch_thread")

USERS = [f"user-{i:02d}" for i in range(10)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mlflow_db_template) -> Iterator[Registry]:
    with make_local_registry(tmp_path_factory.mktemp("home"), mlflow_db_template, resolve_ttl=0.2) as reg:
        yield reg


@pytest.fixture(scope="module")
def published(registry, backbone) -> dict[str, dict]:
    """Each user's production prefix tensors."""
    return {user: publish_user(registry, backbone, user, seed=i)[1] for i, user in enumerate(USERS)}


@pytest.fixture(scope="module")
def client(backbone, registry, published) -> Iterator[httpx.Client]:
    service = PrefixService(backbone, registry, ServeConfig(max_rows=16))
    try:
        with InProcessServer(create_app(service), port=0) as url, httpx.Client(base_url=url, timeout=60) as http:
            yield http
    finally:
        service.close()


def ask(client: httpx.Client, user: str, prompt: str, **extra) -> httpx.Response:
    return client.post("/v1/generate", json={"user_id": user, "prompt": prompt, "max_new_tokens": NEW_TOKENS, **extra})


def test_concurrent_users_each_get_their_own_generation(client, backbone, published):
    jobs = [(user, PROMPTS[i % len(PROMPTS)]) for i, user in enumerate(USERS)] * 2
    for user in USERS:  # warm the cache so that the concurrent round meets in the engine
        assert ask(client, user, "hi").status_code == 200
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: ask(client, *job), jobs))

    expected = [alone(backbone, published[user], prompt) for user, prompt in jobs]
    bodies = [r.json() for r in responses]
    assert [r.status_code for r in responses] == [200] * len(jobs)
    assert [b["text"] for b in bodies] == expected
    assert [b["user_id"] for b in bodies] == [user for user, _ in jobs]
    assert len(set(expected)) > 1
    assert max(b["users_in_batch"] for b in bodies) > 1  # different users shared a forward pass


def test_a_promoted_prefix_is_served_once_noticed(client, registry, backbone, published):
    other = Registry(registry.tracking_uri, registry.store_uri)  # as another process would
    try:
        before = ask(client, "user-03", PROMPTS[0]).json()
        ref, tensors = publish_user(other, backbone, "user-03", seed=99)
    finally:
        other.close()
    assert ref.version != before["version"]
    deadline = time.monotonic() + 10
    while (body := ask(client, "user-03", PROMPTS[0]).json())["version"] != ref.version:
        assert time.monotonic() < deadline, "the promote was never noticed"
        time.sleep(0.05)
    assert (body["sha256"], body["text"]) == (ref.sha256, alone(backbone, tensors, PROMPTS[0]))
    published["user-03"] = tensors


def test_unknown_user_is_404_with_a_clear_message(client):
    response = ask(client, "nobody-here", "hi", namespace="acme")
    assert response.status_code == 404
    assert response.json()["detail"] == "no prefix for user 'nobody-here' in namespace 'acme'"


@pytest.mark.parametrize("body", [
    {"user_id": "user-00"},
    {"user_id": "user-00", "prompt": ""},
    {"user_id": "user-00", "prompt": "hi", "max_new_tokens": 0},
    {"user_id": "user-00", "prompt": "hi", "colour": "red"},
    {"user_id": "user-00", "namespace": "Not Valid!", "prompt": "hi"},
    {"user_id": "tab\there", "prompt": "hi"},
    {"user_id": "user-00", "prompt": "hi", "do_sample": True, "seed": 2**64},
    {"user_id": "user-00", "prompt": "hi", "do_sample": True, "temperature": "inf"},
])
def test_bad_body_is_422(client, body):
    assert client.post("/v1/generate", json=body).status_code == 422


def test_a_request_that_cannot_fit_the_context_is_422(client, backbone):
    response = ask(client, "user-00", "x" * backbone.max_positions)
    assert response.status_code == 422
    assert "exceeds the backbone's context" in response.json()["detail"]


def test_prefix_of_another_backbone_is_409_and_never_used(client, registry, tiny_backbones):
    publish_user(registry, tiny_backbones.load(seed=2), "stranger", seed=5)
    response = ask(client, "stranger", "hi")
    assert response.status_code == 409
    assert "never used" in response.json()["detail"]


def test_openapi_and_health(client, backbone):
    schema = client.get("/openapi.json").json()
    generate = schema["paths"]["/v1/generate"]["post"]
    assert {"404", "409", "422", "200"} <= set(generate["responses"])
    request = schema["components"]["schemas"]["GenerateRequest"]
    assert set(request["required"]) == {"user_id", "prompt"}
    health = client.get("/healthz").json()
    assert (health["status"], health["backbone_fingerprint"]) == ("ok", backbone.fingerprint)
