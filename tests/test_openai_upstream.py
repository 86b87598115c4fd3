"""BACKEND=openai: genai_server in front of another engine, real and scripted, faults included."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from genai_server.backends.discovery import upstream_model_ids
from genai_server.errors import ModelLoadingFailed
from genai_server.exit_status import ExitStatus
from genai_server.settings import SettingsError, load_settings
from tests.harness.bodies import MODEL_ID
from tests.harness.in_process import ClientFactory
from tests.harness.process import ServerProcess, free_port
from tests.harness.responses import metric_sample, stream_chunks
from tests.harness.upstream import USAGE, ScriptedUpstream, chunk, sse
from tests.harness.waiting import eventually_async

PROXIED = "proxied-model"
USAGE_ASKED = {"stream": True, "stream_options": {"include_usage": True}}


def _chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": PROXIED,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 12,
        "temperature": 0,
        **extra,
    }


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second genai_server on the embedded engine, started as a process: a real upstream."""
    with ServerProcess(tmp_path_factory.mktemp("upstream") / "server.log") as server:
        yield server.wait_healthy().url


async def _proxy(make_client: ClientFactory, url: str, **settings: Any) -> Any:
    return await make_client(
        backend="openai",
        upstream_url=url + "/v1",
        model_id=PROXIED,
        upstream_model=settings.pop("upstream_model", MODEL_ID),
        **settings,
    )


async def test_non_streaming_relay_matches_the_upstream(
    make_client: ClientFactory, upstream: str, openai_schema: Any
) -> None:
    proxy = await _proxy(make_client, upstream)
    direct = await make_client()  # the same model in-process: the upstream's answer to compare with
    body = await (await proxy.post("/v1/chat/completions", json=_chat())).json()
    expected = await (await direct.post("/v1/chat/completions", json=_chat(model=MODEL_ID))).json()
    assert body["model"] == PROXIED
    assert body["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert body["usage"] == expected["usage"]
    openai_schema("CreateChatCompletionResponse", {k: v for k, v in body.items() if v is not None})
    assert body["metrics"]["completion_tokens"] == 12
    assert body["metrics"]["time_to_first_token_ms"] <= body["metrics"]["e2e_latency_ms"]
    # The upstream's own figures ride along, apart from ours.
    assert body["metrics"]["backend_reported"]["metrics"]["completion_tokens"] == 12


async def test_streaming_relay_rewrites_the_model_and_ends_with_our_metrics(
    make_client: ClientFactory, upstream: str
) -> None:
    proxy = await _proxy(make_client, upstream)
    resp = await proxy.post(
        "/v1/completions",
        json={
            "model": PROXIED,
            "prompt": "Once",
            "max_tokens": 9,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    chunks = stream_chunks(await resp.text())
    assert {c["model"] for c in chunks} == {PROXIED}
    assert chunks[-1]["usage"]["completion_tokens"] == 9
    assert chunks[-1]["metrics"]["completion_tokens"] == 9
    plain = await proxy.post("/v1/chat/completions", json=_chat(stream=True))
    assert all("usage" not in c for c in stream_chunks(await plain.text()))  # not asked, not sent


async def test_models_lists_the_proxied_model(make_client: ClientFactory, upstream: str) -> None:
    proxy = await _proxy(make_client, upstream)
    body = await (await proxy.get("/v1/models")).json()
    assert [m["id"] for m in body["data"]] == [PROXIED]
    assert (await proxy.post("/v1/chat/completions", json=_chat())).status == 200
    metrics = await (await proxy.get("/metrics")).text()
    assert metric_sample(metrics, "genai_server_requests_total", model=PROXIED, backend="openai", status="200") == 1


async def test_upstream_refusing_connections_is_502(make_client: ClientFactory, openai_schema: Any) -> None:
    proxy = await _proxy(make_client, f"http://127.0.0.1:{free_port()}")
    resp = await proxy.post("/v1/chat/completions", json=_chat())
    assert resp.status == 502
    body = await resp.json()
    openai_schema("ErrorResponse", body)
    assert body["error"]["code"] == "upstream_unavailable"


def test_openai_backend_needs_an_upstream_url() -> None:
    with pytest.raises(SettingsError, match="UPSTREAM_URL"):
        load_settings(["--backend", "openai", "--model-id", "x", "--env-file", "/nonexistent"])


# ---- a scripted upstream: the shapes other engines send, and their faults ---------------------------
# (the ``scripted`` fixture, conftest.py: each model name is a script of tests/harness/upstream.py's ENGINE_SCRIPTS)


@pytest.mark.parametrize(
    ("shape", "reported"),
    [
        ("llamacpp", {"timings": {"predicted_n": 2}}),
        ("llamacpp-usage-on-last", {"timings": {"predicted_n": 2}}),
        ("vllm", {"metrics": {"time_to_first_token_ms": 3.0}}),
        ("sglang", None),
    ],
)
async def test_engine_shapes_become_the_same_response(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream], shape: str, reported: dict[str, Any] | None
) -> None:
    url, seen = scripted
    proxy = await _proxy(make_client, url, upstream_model=shape)
    body = await (await proxy.post("/v1/chat/completions", json=_chat())).json()
    assert body["choices"][0]["message"]["content"] == "Hello"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == 7
    assert body["metrics"]["completion_tokens"] == 2
    assert body["metrics"]["backend_reported"] == reported
    assert seen.bodies[0]["stream"] is True  # always streamed upstream, so we can time it
    assert seen.bodies[0]["stream_options"] == {"include_usage": True}
    stream = await proxy.post("/v1/chat/completions", json=_chat(stream=True, stream_options={"include_usage": True}))
    chunks = stream_chunks(await stream.text())
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Hello"
    assert chunks[-1]["metrics"]["backend_reported"] == reported  # moved beside our figures, once
    assert all("timings" not in c for c in chunks) and all("metrics" not in c for c in chunks[:-1])
    # A client that gets no figures of ours (no usage asked) keeps the engine's own where the engine put them: on
    # a chunk it gets (llama-server's last one). Those an engine sends only on a usage chunk it would not have sent.
    bare = stream_chunks(await (await proxy.post("/v1/chat/completions", json=_chat(stream=True))).text())
    kept = {name: c[name] for c in bare for name in ("timings", "metrics") if name in c}
    assert kept == (reported if shape == "llamacpp-usage-on-last" else {})


async def test_an_engines_own_fields_inside_openai_objects_reach_it(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream]
) -> None:
    """vLLM's ``stream_options.continuous_usage_stats`` and a ``response_format`` type OpenAI does not define were
    refused (400) although the gateway passes an engine's own fields through: now they reach the engine as sent."""
    url, seen = scripted
    proxy = await _proxy(make_client, url, upstream_model="vllm")
    extra = {"stream_options": {"continuous_usage_stats": True}, "response_format": {"type": "regex", "regex": "H.*"}}
    resp = await proxy.post("/v1/chat/completions", json=_chat(stream=True, **extra))
    assert resp.status == 200, await resp.text()
    sent = seen.bodies[-1]
    assert sent["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert sent["response_format"] == {"type": "regex", "regex": "H.*"}


@pytest.mark.parametrize(
    ("script", "status", "code"),
    [
        ("not-found", 404, "model_not_found"),
        ("bad-request", 400, "400"),
        ("crash", 502, "upstream_error"),
        ("malformed", 502, "upstream_error"),
        ("truncated", 502, "upstream_error"),
        ("error-event", 502, "upstream_error"),
    ],
)
async def test_upstream_faults_become_openai_errors(
    make_client: ClientFactory,
    scripted: tuple[str, ScriptedUpstream],
    openai_schema: Any,
    script: str,
    status: int,
    code: str,
) -> None:
    url, _ = scripted
    proxy = await _proxy(make_client, url, upstream_model=script)
    resp = await proxy.post("/v1/chat/completions", json=_chat())
    assert resp.status == status
    body = await resp.json()
    openai_schema("ErrorResponse", body)
    assert body["error"]["code"] == code
    if script == "not-found":
        assert body["error"]["message"] == "model 'x' not here"


@pytest.mark.parametrize("script", ["malformed", "truncated", "error-event"])
async def test_broken_upstream_streams_end_with_an_error_event_then_done(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream], script: str
) -> None:
    url, _ = scripted
    proxy = await _proxy(make_client, url, upstream_model=script)
    resp = await proxy.post("/v1/chat/completions", json=_chat(stream=True))
    assert resp.status == 200
    events = (await resp.text()).strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: ") :])["error"]["type"] == "server_error"
    assert json.loads(events[0][len("data: ") :])["choices"][0]["delta"]["content"] == "Hel"


async def test_upstream_timeout_is_504(make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream]) -> None:
    url, _ = scripted
    proxy = await _proxy(make_client, url, upstream_model="slow", upstream_read_timeout_s=0.3)
    resp = await proxy.post("/v1/chat/completions", json=_chat())
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_timeout"


async def test_a_client_that_leaves_closes_the_upstream_request(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream]
) -> None:
    url, seen = scripted
    proxy = await _proxy(make_client, url, upstream_model="endless")
    resp = await proxy.post("/v1/chat/completions", json=_chat(stream=True))
    await resp.content.readline()
    resp.close()
    await eventually_async(lambda: seen.disconnects)
    assert seen.disconnects == 1


async def test_ready_while_the_upstream_answers_and_not_once_it_is_gone(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream]
) -> None:
    url, _ = scripted
    proxy = await _proxy(make_client, url)
    assert (await proxy.get("/health/ready")).status == 200  # any answer below 500 counts: it is reachable
    gone = await _proxy(make_client, f"http://127.0.0.1:{free_port()}")
    resp = await gone.get("/health/ready")
    assert (resp.status, await resp.json()) == (503, {"status": "unavailable", "models": [PROXIED]})


async def test_usage_on_a_chunk_with_choices_is_counted_and_relayed_only_when_asked(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream]
) -> None:
    """llama-server's shape: the usage rides on the finishing chunk. It is counted (log, metrics, Prometheus)
    either way, and reaches a streaming client only if it asked for it, with our metrics beside it."""
    url, _ = scripted
    proxy = await _proxy(make_client, url, upstream_model="llamacpp-usage-on-last")
    asked = stream_chunks(await (await proxy.post("/v1/chat/completions", json=_chat(**USAGE_ASKED))).text())
    assert asked[-1]["usage"]["total_tokens"] == 7
    assert asked[-1]["metrics"]["completion_tokens"] == 2
    assert asked[-1]["choices"][0]["finish_reason"] == "stop"
    plain = stream_chunks(await (await proxy.post("/v1/chat/completions", json=_chat(stream=True))).text())
    assert all("usage" not in c and "metrics" not in c for c in plain)
    exposition = await (await proxy.get("/metrics")).text()
    assert metric_sample(exposition, "genai_server_generation_tokens_total", model=PROXIED) == 4
    assert metric_sample(exposition, "genai_server_prompt_tokens_total", model=PROXIED) == 10


# ---- serving the models the upstream lists (no MODEL_ID) --------------------------------------------------

LISTINGS: dict[str, Any] = {
    "two": {"object": "list", "data": [{"id": "org/model-a", "object": "model"}, {"id": "model-b"}]},
    "empty": {"object": "list", "data": []},
    "not-a-list": {"data": "model-a"},
    "bad-id": {"data": [{"id": "a\nb"}]},
    "huge": {"data": [{"id": "m" * 200 + str(i)} for i in range(6000)]},
}


@pytest.fixture
async def lister(aiohttp_server: Any) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """An upstream whose /v1/models is the listing its URL path names, and whose chat answers any model."""
    bodies: list[dict[str, Any]] = []

    async def models(request: web.Request) -> web.Response:
        listing = LISTINGS.get(request.match_info["listing"])
        return web.json_response(listing) if listing is not None else web.Response(status=404)

    async def chat(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        payload = sse({**chunk("Hi", "stop"), "model": bodies[-1]["model"]}, USAGE)
        return web.Response(body=payload, content_type="text/event-stream")

    app = web.Application()
    app.router.add_get("/{listing}/v1/models", models)
    app.router.add_post("/{listing}/v1/chat/completions", chat)
    server: TestServer = await aiohttp_server(app)
    yield str(server.make_url("")).rstrip("/"), bodies


async def test_without_a_model_id_the_upstreams_models_are_served(
    make_client: ClientFactory, lister: tuple[str, list[dict[str, Any]]]
) -> None:
    url, bodies = lister
    client = await make_client(backend="openai", upstream_url=url + "/two/v1")
    listed = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in listed["data"]] == ["org/model-a", "model-b"]
    body = await (await client.post("/v1/chat/completions", json=_chat(model="model-b"))).json()
    assert body["model"] == "model-b" and body["choices"][0]["message"]["content"] == "Hi"
    assert bodies[-1]["model"] == "model-b"
    unknown = await client.post("/v1/chat/completions", json=_chat(model="model-c"))
    assert unknown.status == 404


@pytest.mark.parametrize("listing", ["empty", "not-a-list", "bad-id", "huge", "missing"])
async def test_a_listing_that_breaks_the_api_is_a_loading_failure(
    lister: tuple[str, list[dict[str, Any]]], listing: str
) -> None:
    url, _ = lister
    with pytest.raises(ModelLoadingFailed, match="cannot list the upstream's models"):
        await upstream_model_ids(f"{url}/{listing}/v1", aiohttp.ClientTimeout(total=10))


def test_a_process_whose_upstream_cannot_be_listed_exits_unavailable_with_one_clear_line(tmp_path: Path) -> None:
    """Connection refused: the process does not start half alive, and its exit status is one a supervisor retries
    (the upstream may still be starting), not a model that cannot load."""
    with ServerProcess(
        tmp_path / "server.log", BACKEND="openai", UPSTREAM_URL=f"http://127.0.0.1:{free_port()}/v1"
    ) as server:
        proc = server.proc
        proc.wait(timeout=60)
        err = server.log()
    assert proc.returncode == ExitStatus.UNAVAILABLE
    assert "upstream_unavailable" in err and "cannot list the upstream's models" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# ---- every field the upstream sends reaches the client --------------------------------------------------


def _delta(index: int = 0, finish: str | None = None, logprobs: Any = None, **delta: Any) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"id": "c9", "object": "chat.completion.chunk", "created": 9, "model": "up", "choices": [choice]}


def _logprob(token: str) -> dict[str, Any]:
    return {"content": [{"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": []}]}


# vLLM's shapes: reasoning first, then two tool calls streamed OpenAI's way (id, type and name once, arguments in
# pieces), logprobs per token, vLLM's stop_reason on the last choice.
RICH = sse(
    _delta(role="assistant", content=""),
    _delta(reasoning_content="Think", logprobs=_logprob("Think")),
    _delta(reasoning_content="ing.", logprobs=_logprob("ing.")),
    _delta(tool_calls=[{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}]),
    _delta(tool_calls=[{"index": 0, "function": {"arguments": '{"x": '}}]),
    _delta(tool_calls=[{"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]),
    _delta(tool_calls=[{"index": 0, "function": {"arguments": "1}"}}]),
    {**_delta(finish="tool_calls"), "choices": [{**_delta(finish="tool_calls")["choices"][0], "stop_reason": None}]},
    {**USAGE, "id": "c9"},
)


async def test_tool_calls_reasoning_and_logprobs_are_relayed_and_assembled_field_by_field(
    make_client: ClientFactory, aiohttp_server: Any
) -> None:
    async def chat(_: web.Request) -> web.Response:
        return web.Response(body=RICH, content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server: TestServer = await aiohttp_server(app)
    proxy = await _proxy(make_client, str(server.make_url("")).rstrip("/"), upstream_model="rich")

    whole = await (await proxy.post("/v1/chat/completions", json=_chat())).json()
    [choice] = whole["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["stop_reason"] is None
    message = choice["message"]
    assert message["content"] == "" and message["reasoning_content"] == "Thinking."
    assert message["tool_calls"] == [
        {"type": "function", "id": "call_a", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"type": "function", "id": "call_b", "function": {"name": "g", "arguments": "{}"}},
    ]
    assert [entry["token"] for entry in choice["logprobs"]["content"]] == ["Think", "ing."]
    assert whole["usage"]["total_tokens"] == 7 and whole["model"] == PROXIED

    streamed = stream_chunks(await (await proxy.post("/v1/chat/completions", json=_chat(stream=True))).text())
    deltas = [c["choices"][0]["delta"] for c in streamed if c["choices"]]
    sent = [c["choices"][0]["delta"] for c in (json.loads(e[6:]) for e in RICH.split(b"\n\n")[:-2]) if c["choices"]]
    assert deltas == sent  # every delta as the upstream sent it


async def test_the_gateway_forwards_what_the_engine_behind_it_may_take(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream]
) -> None:
    """Tools, structured output, logprobs, penalties, vendor extensions, tool results and image parts are the
    upstream's to accept or refuse: relayed as sent (only the model and streaming with usage are ours)."""
    url, seen = scripted
    proxy = await _proxy(make_client, url, upstream_model="llamacpp")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    messages: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": "x"}}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "42", "tool_call_id": "call_a"},
    ]
    extras = {
        "tools": [tool],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
        "logprobs": True,
        "top_logprobs": 2,
        "presence_penalty": 0.5,
        "chat_template_kwargs": {"enable_thinking": False},
        "guided_json": {"type": "object"},
    }
    resp = await proxy.post("/v1/chat/completions", json=_chat(messages=messages, **extras))
    assert resp.status == 200, await resp.text()
    sent = seen.bodies[-1]
    assert {name: sent[name] for name in extras} == extras
    assert sent["messages"][0]["content"][1] == messages[0]["content"][1]
    assert sent["messages"][1] == messages[1]  # its explicit null content included
    assert sent["messages"][2] == messages[2]
    assert sent["model"] == "llamacpp" and sent["stream"] is True
