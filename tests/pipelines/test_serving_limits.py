"""Back-pressure, limits and fairness over real HTTP: a full line is a 429 with Retry-After and
never another tenant's problem, a flooding tenant does not starve another, a client that leaves
frees its row, a request past its time is a 504, and shutdown finishes the rows it runs."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest

from prefixfleet.pipelines.serving import InProcessServer, PrefixService, ServeConfig, create_app
from prefixfleet.registry import Registry
from prefixfleet.workers.backbone import Backbone
from tests.fixtures.servers import make_local_registry
from tests.pipelines.serving_support import publish_user

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def endless(tiny_backbones) -> Backbone:
    """Rows run to their token limit unless cancelled; a little larger than the tiny default, so that a
    long row surely holds its slot while the test queues more."""
    backbone = tiny_backbones.load(hidden=128, layers=4)
    backbone.model.generation_config.eos_token_id = None
    return backbone


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mlflow_db_template, endless) -> Iterator[Registry]:
    with make_local_registry(tmp_path_factory.mktemp("home"), mlflow_db_template) as reg:
        for i, namespace in enumerate(("flood", "calm")):
            publish_user(reg, endless, "u", seed=i, namespace=namespace)
        yield reg


@contextmanager
def serving(backbone: Backbone, registry: Registry, **config) -> Iterator[tuple[str, PrefixService, InProcessServer]]:
    service = PrefixService(backbone, registry, ServeConfig(**config))
    server = InProcessServer(create_app(service), port=0)
    try:
        yield server.start(), service, server
    finally:
        server.stop()
        service.close()


def completion(url: str, model: str, tokens: int) -> openai.types.Completion:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    return client.completions.create(model=model, prompt="hi", max_tokens=tokens, temperature=0)


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_line_is_429_with_retry_after_and_other_tenants_still_queue(endless, registry):
    with serving(endless, registry, max_rows=1, max_queue_per_tenant=2, max_queue=4) as (url, service, _), \
            ThreadPoolExecutor(4) as pool:
        running = pool.submit(completion, url, "flood/u", 480)
        wait_until(lambda: service.engine.running == 1)
        waiting = [pool.submit(completion, url, "flood/u", 2) for _ in range(2)]
        wait_until(lambda: service.engine.queued == 2)
        with pytest.raises(openai.RateLimitError) as refused:
            completion(url, "flood/u", 2)
        calm = pool.submit(completion, url, "calm/u", 2)
        wait_until(lambda: service.engine.queued == 3)  # the other tenant's line had room
        assert refused.value.response.headers["Retry-After"] == "1"
        assert "namespace 'flood'" in refused.value.body["message"]
        for future in [running, *waiting, calm]:
            assert future.result(timeout=120).choices[0].finish_reason == "length"


def test_a_flooding_tenant_does_not_starve_another(endless, registry):
    finished: list[str] = []
    lock = threading.Lock()

    def ask(model: str) -> None:
        completion(url, model, 12)
        with lock:
            finished.append(model)

    with serving(endless, registry, max_rows=2) as (url, service, _), ThreadPoolExecutor(40) as pool:
        flood = [pool.submit(ask, "flood/u") for _ in range(30)]
        wait_until(lambda: service.engine.queued >= 20)
        calm = [pool.submit(ask, "calm/u") for _ in range(3)]
        for future in flood + calm:
            future.result(timeout=300)
    last_calm = max(i for i, model in enumerate(finished) if model == "calm/u")
    assert finished[last_calm + 1:].count("flood/u") >= 15  # calm was served while flood still waited


def test_a_client_that_goes_away_frees_its_row(endless, registry):
    with serving(endless, registry, max_rows=2) as (url, service, _):
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=0.2) as http:
            http.post("/v1/completions", json={"model": "calm/u", "prompt": "hi", "max_tokens": 500})
        wait_until(lambda: service.engine.running == 0, timeout=10)
        assert service.engine.stats.finished == 0


def test_a_request_past_the_timeout_is_504_and_its_row_is_freed(endless, registry):
    with serving(endless, registry, request_timeout_s=0.3) as (url, service, _):
        with pytest.raises(openai.APIStatusError) as late:
            completion(url, "calm/u", 400)
        assert late.value.status_code == 504 and "within 0.3 s" in late.value.body["message"]
        wait_until(lambda: service.engine.running == 0, timeout=10)


def test_shutdown_finishes_the_rows_it_is_running(endless, registry):
    with serving(endless, registry) as (url, service, server), ThreadPoolExecutor(1) as pool:
        answer = pool.submit(completion, url, "calm/u", 150)
        wait_until(lambda: service.engine.running == 1)
        server.stop()  # stops taking requests, lets the running one finish
        done = answer.result(timeout=120)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 150
