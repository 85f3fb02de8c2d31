"""The server's own OpenAPI schema, fuzzed over real HTTP on loopback (schemathesis): requests the
schema admits and requests it nearly admits (wrong types, missing or unknown fields, values out of
range) each get an answer below 500 — a 4xx names the problem — and the server stays up. Bounded:
a fixed number of examples per operation, no shrinking, derandomized so the suite sends the same
requests every run. Random runs of it found two bugs that killed the engine's thread, a seed past
64 bits and a temperature too small for float32; their own tests hold them now
(test_serving_engine.py, test_decoding.py)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from prefixfleet.pipelines.serving import InProcessServer, PrefixService, ServeConfig, create_app
from tests.fixtures.servers import make_local_registry
from tests.pipelines.serving_support import publish_user

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXAMPLES = 40  # per operation


@pytest.fixture(scope="module")
def served(tiny_backbones, tmp_path_factory, mlflow_db_template) -> Iterator[str]:
    backbone = tiny_backbones.load()
    with make_local_registry(tmp_path_factory.mktemp("home"), mlflow_db_template) as registry:
        for namespace in ("default", "acme"):
            publish_user(registry, backbone, "alice", seed=0, namespace=namespace)
        service = PrefixService(backbone, registry, ServeConfig(max_new_tokens=16, max_prompt_tokens=256,
                                                                request_timeout_s=30))
        server = InProcessServer(create_app(service), port=0)
        try:
            yield server.start()
        finally:
            server.stop()
            service.close()


def fuzz(served: str, operation, mode: GenerationMode) -> Counter[int]:
    @given(case=operation.as_strategy(mode), user=st.sampled_from([None, "alice", "acme/alice"]))
    @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck),
              database=None, derandomize=True)
    def check(case, user: str | None) -> None:
        if user is not None and isinstance(case.body, dict):  # most requests then reach a real prefix
            for field, value in (("model", user), ("user_id", "alice")):
                if field in case.body:
                    case.body[field] = value
        response = case.call(timeout=30)
        outcomes[response.status_code // 100] += 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        if 400 <= response.status_code < 500:
            assert response.json(), response.text  # a reason, not an empty body

    outcomes: Counter[int] = Counter()
    check()
    assert httpx.get(f"{served}/healthz", timeout=10).status_code == 200  # still up
    return outcomes


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_nothing_a_client_sends_is_a_server_error(served: str, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/generate"}
    outcomes: Counter[int] = Counter()
    for operation in operations:
        takes_input = any(len(part) for part in (operation.body, operation.query, operation.path_parameters))
        if mode is GenerationMode.NEGATIVE and not takes_input:
            continue  # nothing to get wrong
        outcomes += fuzz(served, operation, mode)
    assert outcomes[4] > 0 and (mode is GenerationMode.NEGATIVE or outcomes[2] > 0), outcomes
