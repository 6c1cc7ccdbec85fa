"""Fuzzing the OpenAI-compatible HTTP API with schemathesis against its own OpenAPI schema,
over a real server (uvicorn), Redis and Ray workers: every answer has a status code the schema
documents and none is a server error; the server stays healthy and serves a normal turn
afterwards."""
from __future__ import annotations

import httpx2 as httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import status_code_conformance
from servicehelpers import serving, worker_stack

KEY = {"Authorization": "Bearer key-a"}


@pytest.fixture(scope="module")
def fuzz_server(redis_server, tmp_path_factory):
    with worker_stack(redis_server, str(tmp_path_factory.mktemp("ray")), "http-fuzz", 4) as stack, \
            serving(stack.loop, stack.pool, stack.redis.url, http_port=0, max_tokens=8, default_max_tokens=4,
                    queue_timeout_s=5.0) as server:
        yield f"http://127.0.0.1:{server.http.port}"


CASES_PER_OPERATION = 100  # and generation mode


def test_only_documented_status_codes(fuzz_server):
    # schemathesis' pytest plugin does not run under this pytest: its strategies, driven here.
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 6
    calls = 0

    @settings(max_examples=CASES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(operation, mode, data):
        nonlocal calls
        case = data.draw(operation.as_strategy(mode))
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "tiny"  # past the model check, into the servicer
        response = case.call(headers=KEY, timeout=60)
        calls += 1
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
    for operation in operations:
        # Bodies that fit the schema, and (where there is a body) bodies that do not.
        for mode in GenerationMode if operation.method.upper() == "POST" else [GenerationMode.POSITIVE]:
            fuzz(operation, mode)
    assert calls >= 3 * len(operations)


def test_healthy_afterwards(fuzz_server):
    assert httpx.get(f"{fuzz_server}/health").json() == {"status": "ok"}
    r = httpx.post(f"{fuzz_server}/v1/chat/completions", headers=KEY, timeout=60,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
