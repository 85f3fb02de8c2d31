"""Serving on the real servers (an `mlflow server` and an S3-compatible server on loopback):
concurrent users over HTTP get their own generations, and a promote made by another registry
client is served once noticed."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from prefixfleet.pipelines.serving import InProcessServer, PrefixService, ServeConfig, create_app
from prefixfleet.registry import Registry
from tests.pipelines.serving_support import NEW_TOKENS, PROMPTS, alone, each_alone, publish_user

pytestmark = pytest.mark.servers


def test_serving_from_the_real_servers(make_server_registry, s3_endpoint, tiny_backbones):
    backbone = tiny_backbones.load()
    registry = make_server_registry(resolve_ttl=0.2)
    other = Registry(registry.tracking_uri, registry.store_uri, s3_endpoint_url=s3_endpoint,
                     model_prefix=registry.prefix)
    users = [f"s{i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        tensors = dict(zip(users, pool.map(lambda i: publish_user(other, backbone, users[i], seed=i)[1], range(8)), strict=True))
    service = PrefixService(backbone, registry, ServeConfig())
    try:
        with InProcessServer(create_app(service), port=0) as url, httpx.Client(base_url=url, timeout=60) as http:
            def ask(user: str, prompt: str) -> dict:
                response = http.post("/v1/generate", json={"user_id": user, "prompt": prompt, "max_new_tokens": NEW_TOKENS})
                assert response.status_code == 200, response.text
                return response.json()

            jobs = [(user, PROMPTS[i % len(PROMPTS)]) for i, user in enumerate(users)]
            with ThreadPoolExecutor(len(jobs)) as pool:
                texts = [body["text"] for body in pool.map(lambda job: ask(*job), jobs)]
            assert texts == each_alone(backbone, tensors, jobs)

            ref, new = publish_user(other, backbone, "s0", seed=100)
            deadline = time.monotonic() + 15
            while (body := ask("s0", PROMPTS[0]))["version"] != ref.version:
                assert time.monotonic() < deadline, "the promote was never noticed"
                time.sleep(0.1)
            assert body["text"] == alone(backbone, new, PROMPTS[0])
            assert http.post("/v1/generate", json={"user_id": "nobody", "prompt": "hi"}).status_code == 404
    finally:
        service.close()
        other.close()
