"""The Ray Serve deployment on local Ray answers over HTTP with the same app, engine and keys as
the in-process server, streaming included, through the `openai` client."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from prefixfleet.pipelines.serving import ServeConfig, ray_app
from prefixfleet.pipelines.serving.keys import ApiKeys, digest
from tests.fixtures.servers import free_port
from tests.pipelines.serving_support import NEW_TOKENS, PROMPTS, each_alone, publish_user

pytestmark = pytest.mark.ray


@pytest.fixture
def ray_serve(local_ray) -> Iterator[None]:
    from ray import serve

    yield
    serve.shutdown()


def test_ray_serve_deployment_answers(ray_serve, local_registry, tiny_backbones):
    backbone = tiny_backbones.load()
    users = {f"r{i}": publish_user(local_registry, backbone, f"r{i}", seed=i)[1] for i in range(4)}
    where = local_registry.address
    port = free_port()
    keys = ApiKeys({digest("pf-test"): "default"})
    ray_app.run(ray_app.build(backbone.name_or_path, where, ServeConfig(), keys=keys), port=port)

    def ask(user: str, prompt: str) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{port}/v1/generate", timeout=120, headers={"Authorization": "Bearer pf-test"},
                          json={"user_id": user, "prompt": prompt, "max_new_tokens": NEW_TOKENS})

    jobs = [(user, PROMPTS[i]) for i, user in enumerate(users)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: ask(*job), jobs))
    assert [r.status_code for r in responses] == [200] * len(jobs)
    assert [r.json()["text"] for r in responses] == each_alone(backbone, users, jobs)
    missing = ask("nobody", "hi")
    assert (missing.status_code, missing.json()["detail"]) == (404, "no prefix for user 'nobody' in namespace 'default'")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="pf-test", max_retries=0, timeout=120)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="r0", prompt=PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0, stream=True) if c.choices)
    assert streamed == responses[0].json()["text"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
