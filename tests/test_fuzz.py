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
    """No 5xx; any error in the OpenAI envelope with a string (or null) code."""
    path = response.request.path_url.split("?")[0]
    CASES["/v1/models/{model_id}" if path.startswith("/v1/models/") else path] += 1
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str)
        assert error["code"] is None or isinstance(error["code"], str)


def test_every_operation_survives_schemathesis(server_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{server_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) == 7
    for operation in operations:

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case: Any) -> None:
            _check(case.call(base_url=server_url))

        call()
    print(f"schemathesis cases by operation: {dict(CASES)}")  # recorded in docs/reliability.md (pytest -s)
    assert CASES["/v1/chat/completions"] >= EXAMPLES and CASES["/v1/completions"] >= EXAMPLES


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
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
