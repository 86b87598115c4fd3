"""Fuzzing: schemathesis drives every operation of /openapi.json, hypothesis throws arbitrary JSON at the
request models. Whatever arrives: no 5xx, every error in the envelope, and the server still answers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genai_server.http.routes import endpoint_table
from tests.harness.bodies import MODEL_ID
from tests.harness.process import ServerProcess

pytestmark = pytest.mark.slow  # hundreds of fuzzed requests: `-m 'not slow'` leaves them out of a quick run

# Enough to find what a fuzzer finds in seconds, few enough for CI on 2 cores.
EXAMPLES = 60

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_fields = {
    "model": st.sampled_from([MODEL_ID, "nope", ""]) | _json,
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "tool", "x"]), "content": st.text(max_size=40) | _json}
        ),
        max_size=3,
    )
    | _json,
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 600), max_size=8) | _json,
    "max_tokens": st.integers(-3, 5000) | _json,
    "temperature": st.floats(-1, 3) | _json,
    "top_p": st.floats(-1, 2) | _json,
    "n": st.integers(-1, 20) | _json,
    "stream": st.booleans() | _json,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6) | _json,
    "seed": _json,
    # The Responses API's own.
    "input": st.text(max_size=40)
    | st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "x"])},
            optional={
                "role": st.sampled_from(["user", "assistant", "x"]),
                "content": st.text(max_size=20) | _json,
                "call_id": _json,
                "name": _json,
                "arguments": _json,
                "output": _json,
            },
        ),
        max_size=3,
    )
    | _json,
    "instructions": st.text(max_size=20) | _json,
    "max_output_tokens": st.integers(-3, 5000) | _json,
    "text": _json,
    "tools": _json,
    "previous_response_id": _json,
    # Anthropic's and the tokenizer's.
    "system": st.text(max_size=20) | _json,
    "stop_sequences": _json,
    "tool_choice": _json,
    "output_config": _json,
    "content": st.text(max_size=20) | _json,
    "tokens": st.lists(st.integers(-5, 2**33), max_size=8) | _json,
}
_bodies = st.fixed_dictionaries({}, optional=_fields) | _json


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server process; small limits keep each fuzzed generation short."""
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    with ServerProcess(log, MAX_TOKENS_LIMIT="16", MAX_QUEUED_REQUESTS="64") as server:
        yield server.wait_healthy().url


CASES: Counter[str] = Counter()


def _check(response: requests.Response | Any) -> None:
    """No 5xx; any error in the OpenAI envelope with a string (or null) code (Anthropic's on its routes)."""
    path = response.request.path_url.split("?")[0]
    CASES[_operation_path(path)] += 1
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and path.startswith("/v1/messages"):  # Anthropic's envelope on its routes
        body = response.json()
        assert body["type"] == "error" and isinstance(body["error"]["type"], str) and body["error"]["message"]
    elif response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str)
        assert error["code"] is None or isinstance(error["code"], str)


def _operation_path(path: str) -> str:
    for prefix, parameter in (("/v1/models/", "{model_id}"), ("/v1/responses/", "{response_id}")):
        if path.startswith(prefix):
            return prefix + parameter
    return path


def test_every_operation_survives_schemathesis(server_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{server_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) == len([e for e in endpoint_table(metrics_public=True) if e.documented])
    for operation in operations:

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case: Any) -> None:
            _check(case.call(base_url=server_url))

        call()
    print(f"schemathesis cases by operation: {dict(CASES)}")  # recorded in docs/reliability.md (pytest -s)
    assert all(CASES[path] >= EXAMPLES for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"))


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/tokenize"]
)
def test_arbitrary_json_bodies(server_url: str, path: str) -> None:
    @settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=_bodies)
    def post(body: Any) -> None:
        _check(requests.post(server_url + path, json=body, timeout=30))

    before = CASES[path]
    post()
    assert CASES[path] - before >= EXAMPLES
    print(f"hypothesis JSON bodies on {path}: {CASES[path] - before}")
    # Still serving after all of it.
    ok = requests.post(
        server_url + "/v1/completions", json={"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}, timeout=30
    )
    assert ok.status_code == 200
