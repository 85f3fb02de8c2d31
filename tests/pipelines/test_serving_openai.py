"""The OpenAI-compatible routes through the official `openai` client over real HTTP on loopback:
completions and chat completions, streaming and not, `model` naming the user, usage counts,
paged model listing, and OpenAI-style errors."""
from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from prefixfleet.pipelines.serving import InProcessServer, PrefixService, ServeConfig, create_app
from prefixfleet.registry import Registry
from prefixfleet.workers.decoding import prompt_ids
from tests.fixtures.servers import make_local_registry
from tests.pipelines.serving_support import NEW_TOKENS, PROMPTS, alone, publish_all

pytestmark = pytest.mark.usefixtures("one_torch_thread")

USERS = [("default", "ana"), ("default", "bo"), ("acme", "team/cy"), ("acme", "dee")]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mlflow_db_template) -> Iterator[Registry]:
    with make_local_registry(tmp_path_factory.mktemp("home"), mlflow_db_template) as reg:
        yield reg


@pytest.fixture(scope="module")
def published(registry, backbone) -> dict[str, dict]:
    """Each model id's production prefix tensors."""
    return publish_all(registry, backbone, USERS)


@pytest.fixture(scope="module")
def url(backbone, registry, published) -> Iterator[str]:
    service = PrefixService(backbone, registry, ServeConfig(max_rows=16))
    try:
        with InProcessServer(create_app(service), port=0) as base:
            yield base
    finally:
        service.close()


@pytest.fixture
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_completions_for_many_users_at_once_each_equal_the_user_alone(client, backbone, published):
    jobs = [(model, PROMPTS[i % len(PROMPTS)]) for i, model in enumerate(published)] * 3
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: client.completions.create(
            model=job[0], prompt=job[1], max_tokens=NEW_TOKENS, temperature=0), jobs))

    assert [a.choices[0].text for a in answers] == [alone(backbone, published[m], p) for m, p in jobs]
    assert [a.model for a in answers] == [m for m, _ in jobs]
    for answer, (_, prompt) in zip(answers, jobs, strict=True):
        assert answer.object == "text_completion" and answer.choices[0].finish_reason in ("stop", "length")
        assert answer.usage.prompt_tokens == len(prompt_ids(backbone, prompt))
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
        assert 1 <= answer.usage.completion_tokens <= NEW_TOKENS


def test_a_bare_user_is_the_default_namespace_and_user_ids_may_hold_a_slash(client, backbone, published):
    bare = client.completions.create(model="ana", prompt=PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0)
    full = client.completions.create(model="default/ana", prompt=PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0)
    slash = client.completions.create(model="acme/team/cy", prompt=PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0)
    assert bare.choices[0].text == full.choices[0].text == alone(backbone, published["default/ana"], PROMPTS[0])
    assert slash.choices[0].text == alone(backbone, published["acme/team/cy"], PROMPTS[0])


def test_streamed_completions_add_up_to_the_answer(client):
    kwargs = dict(model="acme/dee", prompt=[PROMPTS[0], PROMPTS[2]], max_tokens=NEW_TOKENS, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))

    texts = ["", ""]
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]
    reasons = {c.index: c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({chunk.id for chunk in chunks}) == 1


def test_seeded_samples_repeat_and_n_draws_several(client):
    kwargs = dict(model="default/bo", prompt=PROMPTS[1], max_tokens=NEW_TOKENS, temperature=1.0, top_p=0.9, seed=5)
    first = client.completions.create(**kwargs, n=3)
    again = client.completions.create(**kwargs, n=3)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len({c.text for c in first.choices}) > 1


def test_a_stop_string_ends_the_text_before_it(client, backbone, published):
    full = alone(backbone, published["default/ana"], PROMPTS[0])
    stop = full[len(full) // 2:][:2]
    answer = client.completions.create(model="ana", prompt=PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0,
                                       stop=[stop])
    assert answer.choices[0].text == full[: full.find(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_chat_needs_a_template_and_then_answers_through_it(client, backbone, published):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "order 3 kite"}]
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="ana", messages=messages)

    backbone.tokenizer.chat_template = CHAT_TEMPLATE
    try:
        answer = client.chat.completions.create(model="ana", messages=messages, max_tokens=NEW_TOKENS, temperature=0)
        stream = list(client.chat.completions.create(model="ana", messages=messages, max_tokens=NEW_TOKENS,
                                                     temperature=0, stream=True))
        unbounded = client.chat.completions.create(model="ana", messages=messages, temperature=0)
    finally:
        backbone.tokenizer.chat_template = None
    rendered = "system: be brief\nuser: order 3 kite\nassistant:"
    assert answer.choices[0].message.content == alone(backbone, published["default/ana"], rendered)
    assert answer.choices[0].message.role == "assistant" and answer.object == "chat.completion"
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == answer.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == answer.choices[0].finish_reason
    assert unbounded.choices[0].finish_reason in ("stop", "length")


def test_models_lists_users_with_production_a_page_at_a_time(client, url):
    assert sorted(m.id for m in client.models.list()) == sorted(f"{ns}/{u}" for ns, u in USERS)
    seen, after = [], None
    with httpx.Client(base_url=url, timeout=30) as http:
        while True:
            page = http.get("/v1/models", params={"limit": 3} | ({"after": after} if after else {})).json()
            seen += [m["id"] for m in page["data"]]
            if not page["has_more"]:
                break
            after = page["data"][-1]["id"]
    assert sorted(seen) == sorted(f"{ns}/{u}" for ns, u in USERS) and len(seen) == len(set(seen))


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    (dict(model="default/nobody"), openai.NotFoundError, "no prefix for user 'nobody'"),
    (dict(model="Not A Namespace/x"), openai.NotFoundError, "does not exist"),
    (dict(model="ana", presence_penalty=1.0), openai.UnprocessableEntityError, "presence_penalty is not supported"),
    (dict(model="ana", max_tokens=0), openai.UnprocessableEntityError, "max_tokens"),
    (dict(model="ana", n=99), openai.UnprocessableEntityError, "n: "),
    (dict(model="ana", stop=[""]), openai.UnprocessableEntityError, "stop"),
    (dict(model="ana", prompt=""), openai.UnprocessableEntityError, "prompt"),
    (dict(model="ana", max_tokens=1000), openai.UnprocessableEntityError, "exceeds the backbone's context"),
    (dict(model="ana", max_tokens=10_000), openai.UnprocessableEntityError, "this server's limit of 1024 new tokens"),
    (dict(model="ana", prompt="x" * 9000), openai.UnprocessableEntityError, "at most 8192 prompt tokens"),
    (dict(model="ana", seed=-(2**70), temperature=1.0), openai.UnprocessableEntityError, "seed"),
])
def test_bad_requests_get_an_openai_error_naming_the_problem(client, kwargs, error, words):
    with pytest.raises(error) as raised:
        client.completions.create(**({"prompt": "hi"} | kwargs))
    body = raised.value.body
    assert words in body["message"] and "\n" not in body["message"]


def test_a_client_that_leaves_a_stream_frees_its_row(tiny_backbones, registry, published):
    endless = tiny_backbones.load()
    endless.model.generation_config.eos_token_id = None  # rows run to max_tokens unless cancelled
    service = PrefixService(endless, registry, ServeConfig(max_rows=4))
    try:
        with InProcessServer(create_app(service), port=0) as base, httpx.Client(base_url=base, timeout=60) as http:
            body = {"model": "ana", "prompt": "hi", "max_tokens": endless.max_positions - 40, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()  # held: a dropped iterator closes the connection
                assert next(lines).startswith("data: ")
                assert http.get("/healthz").json()["running"] == 1
            deadline = time.monotonic() + 30
            while http.get("/healthz").json()["running"]:
                assert time.monotonic() < deadline, "the row outlived its client"
                time.sleep(0.05)
            assert service.engine.stats.finished == 0  # cancelled, not run to its end
    finally:
        service.close()


def test_metrics_count_what_was_served(client, url):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = scrape()
    answers = [client.completions.create(model="default/bo", prompt=p, max_tokens=NEW_TOKENS, temperature=0)
               for p in PROMPTS]
    after = scrape()

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert grew("prefixfleet_generated_tokens_total") == sum(a.usage.completion_tokens for a in answers)
    assert grew("prefixfleet_time_to_first_token_seconds_count") == len(PROMPTS)
    assert grew("prefixfleet_request_latency_seconds_count") == len(PROMPTS)
    assert grew("prefixfleet_decode_rows_total") >= grew("prefixfleet_decode_steps_total") > 0
    assert grew("prefixfleet_prefix_cache_hits_total", tier="device") >= len(PROMPTS) - 1
    assert after[("prefixfleet_queue_depth", ())] == 0
