"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) through the ``anthropic`` SDK: create,
stream, parse, a tool loop, token counts, errors raised as its own exception classes; each streamed event and each
message checked against the SDK's published types; ``x-api-key``; and the same API through the gateway.

(The SDK of this year sends no sampling parameters: ``temperature`` goes in ``extra_body``, as older clients send
it.) Structured outputs use enum-only strict schemas, so that even the random bundled model ends on its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

import anthropic
import pytest
from aiohttp.test_utils import TestClient, TestServer
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import BaseModel, TypeAdapter

from genai_server.app import create_app
from tests.harness.bodies import MODEL_ID
from tests.harness.in_process import ClientFactory, make_settings
from tests.harness.responses import named_events
from tests.harness.upstream import NATIVE_MESSAGE, NATIVE_MESSAGE_EVENTS, ScriptedUpstream

KEY = "k1"
GREEDY = {"temperature": 0}
WEATHER_TOOL: Any = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
PROXIED = "proxied-model"


class Weather(BaseModel):
    """The weather in a city."""

    city: Literal["Paris", "Oslo"]
    unit: Literal["C"]


@pytest.fixture
async def base_url(aiohttp_server: Any) -> str:
    server: TestServer = await aiohttp_server(create_app(make_settings(api_keys=KEY)))
    return str(server.make_url(""))


@pytest.fixture
async def claude(base_url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key=KEY, max_retries=0) as client:
        yield client


def _check_events(events: list[dict[str, Any]]) -> None:
    """Each event is one of the SDK's types, in the order Anthropic sends them: a start, a ping, blocks each
    started, added to and stopped, then the message's delta and its stop."""
    for event in events:
        if event["type"] != "ping":  # sent, but not among the SDK's event types
            EVENTS.validate_python(event)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    open_block = None
    for event in events[2:-2]:
        if event["type"] == "content_block_start":
            assert open_block is None
            open_block = event["index"]
        else:
            assert event["index"] == open_block
            if event["type"] == "content_block_stop":
                open_block = None
    assert open_block is None


async def test_create_answers_with_a_message_its_usage_and_our_figures(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model=MODEL_ID,
        max_tokens=6,
        system="Be brief",
        messages=[{"role": "user", "content": "Hello"}],
        extra_body=GREEDY,
    )
    Message.model_validate(message.model_dump())
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 6
    (block,) = message.content
    assert block.type == "text" and block.text
    figures = (message.model_extra or {})["metrics"]
    assert figures["prompt_tokens"] == message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    counted = await claude.messages.count_tokens(
        model=MODEL_ID, system="Be brief", messages=[{"role": "user", "content": "Hello"}]
    )
    assert counted.input_tokens == figures["prompt_tokens"]  # the same prompt, counted by the same tokenizer


async def test_stream_events_follow_the_published_types(make_client: ClientFactory) -> None:
    client = await make_client()
    body = {
        "model": MODEL_ID,
        "max_tokens": 6,
        "stream": True,
        "temperature": 0,  # greedy: the answer runs to its limit (sampled, it may end sooner)
        "messages": [{"role": "user", "content": "Hello"}],
    }
    resp = await client.post("/v1/messages", json=body)
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    events = named_events(await resp.text())
    _check_events(events)
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    delta = events[-2]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 6
    assert delta["metrics"]["completion_tokens"] == 6 and text


async def test_the_sdks_stream_and_parse_helpers(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model=MODEL_ID, max_tokens=6, messages=[{"role": "user", "content": "Hi"}], extra_body=GREEDY
    ) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    (block,) = final.content
    assert block.type == "text" and "".join(texts) == block.text
    parsed = await claude.messages.parse(
        model=MODEL_ID,
        max_tokens=300,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        output_format=Weather,
        extra_body=GREEDY,
    )
    assert isinstance(parsed.parsed_output, Weather) and parsed.stop_reason == "end_turn"


async def test_a_tool_loop(claude: anthropic.AsyncAnthropic) -> None:
    question: Any = {"role": "user", "content": "What is the weather in Paris?"}
    first = await claude.messages.create(
        model=MODEL_ID,
        max_tokens=300,
        messages=[question],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        extra_body=GREEDY,
    )
    assert first.stop_reason == "tool_use"
    (call,) = [block for block in first.content if block.type == "tool_use"]
    assert call.name == "get_weather" and call.input in ({"city": "Paris"}, {"city": "Oslo"})
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "21 C and sunny"}
    history: Any = [question, {"role": "assistant", "content": first.content}, {"role": "user", "content": [result]}]
    second = await claude.messages.parse(
        model=MODEL_ID,
        max_tokens=300,
        messages=history,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "none"},
        output_format=Weather,
        extra_body=GREEDY,
    )
    assert isinstance(second.parsed_output, Weather)
    alone = await claude.messages.count_tokens(
        model=MODEL_ID,
        messages=[question],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "none"},
    )
    # The call and its result are in the prompt (Anthropic counts the part read from the cache apart).
    assert second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0) > alone.input_tokens


async def test_errors_are_the_sdks_exception_classes(base_url: str, claude: anthropic.AsyncAnthropic) -> None:
    hello: Any = [{"role": "user", "content": "Hello"}]
    with pytest.raises(anthropic.BadRequestError) as bad:
        await claude.messages.create(model=MODEL_ID, max_tokens=5000, messages=hello)
    assert bad.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "At most 4096 tokens per choice (MAX_TOKENS_LIMIT)"},
    }
    with pytest.raises(anthropic.NotFoundError):
        await claude.messages.create(model="no-such-model", max_tokens=5, messages=hello)
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(anthropic.AuthenticationError) as denied:
            await stranger.messages.create(model=MODEL_ID, max_tokens=5, messages=hello)
    body: Any = denied.value.body
    assert body["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": [{"role": "system", "content": [{"type": "image"}]}]}, "text blocks"),
        ({"messages": [{"role": "user", "content": [{"type": "document"}]}]}, "document"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "tool_use_id"),
        ({"temperature": 1.5}, "temperature"),
        ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop sequences"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "not supported"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({"tool_choice": {"type": []}}, "tool_choice"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": "abc"}]}]}, "source"),
        ({"thinking": {"type": "enabled"}, "chat_template_kwargs": "x"}, "chat_template_kwargs"),
        ({"metadata": {"user_id": 2**70}}, "64 bits"),
        ({"output_config": {"format": {"type": "regex"}}}, "output_config.format"),
        ({"mcp_servers": [{"url": "http://x"}]}, "mcp_servers"),
    ],
)
async def test_bad_input_is_a_400_in_anthropics_envelope(
    client: TestClient[Any, Any], change: dict[str, Any], words: str
) -> None:
    body = {"model": MODEL_ID, "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}], **change}
    resp = await client.post("/v1/messages", json={k: v for k, v in body.items() if v is not None})
    assert resp.status == 400, await resp.text()
    error = await resp.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert words in error["error"]["message"]


async def test_an_unknown_route_and_a_bad_body_on_it_keep_anthropics_envelope(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/v1/messages", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["type"] == "error"
    assert "error" in (await (await client.get("/v1/messages")).json())  # a 405: the route's envelope too


async def test_x_api_key_is_accepted_on_every_route(make_client: ClientFactory) -> None:
    client = await make_client(api_keys=KEY)
    chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert (await client.post("/v1/chat/completions", json=chat, headers={"x-api-key": KEY})).status == 200
    assert (await client.post("/v1/chat/completions", json=chat, headers={"x-api-key": "nope"})).status == 401


# ---- through the gateway ---------------------------------------------------------------------------------------


async def _proxy(make_client: ClientFactory, url: str, shape: str) -> TestClient[Any, Any]:
    return await make_client(backend="openai", upstream_url=url + "/v1", model_id=PROXIED, upstream_model=shape)


def _small(**change: Any) -> dict[str, Any]:
    return {"model": PROXIED, "max_tokens": 6, "messages": [{"role": "user", "content": "Hello"}], **change}


async def test_the_gateway_translates_to_the_engines_chat_completions(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream]
) -> None:
    url, seen = scripted
    proxy = await _proxy(make_client, url, "vllm")
    whole = await (await proxy.post("/v1/messages", json=_small(system=[{"type": "text", "text": "Be brief"}]))).json()
    Message.model_validate(whole)
    assert whole["content"] == [{"type": "text", "text": "Hello"}] and whole["stop_reason"] == "end_turn"
    assert whole["usage"]["input_tokens"] == 5 and whole["usage"]["output_tokens"] == 2
    sent = seen.bodies[-1]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief"} and sent["max_completion_tokens"] == 6
    events = named_events(await (await proxy.post("/v1/messages", json=_small(stream=True))).text())
    _check_events(events)
    assert events[-2]["metrics"]["time_to_first_token_ms"] is not None


async def test_an_engines_reasoning_and_tool_call_become_thinking_and_tool_use_blocks(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream]
) -> None:
    url, _ = scripted
    thinking = await _proxy(make_client, url, "reasoning")
    events = named_events(await (await thinking.post("/v1/messages", json=_small(stream=True))).text())
    _check_events(events)
    blocks = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert blocks == ["thinking", "text"]
    thought = "".join(e["delta"].get("thinking", "") for e in events if e["type"] == "content_block_delta")
    assert thought == "Thinking."

    calling = await _proxy(make_client, url, "tool-call")
    whole = await (await calling.post("/v1/messages", json=_small(tools=[WEATHER_TOOL]))).json()
    Message.model_validate(whole)
    assert (
        whole["content"] == [{"type": "tool_use", "id": "call_up1", "name": "get_weather", "input": {"city": "Paris"}}]
        and whole["stop_reason"] == "tool_use"
    )
    events = named_events(
        await (await calling.post("/v1/messages", json=_small(stream=True, tools=[WEATHER_TOOL]))).text()
    )
    _check_events(events)
    pieces = "".join(e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta")
    assert pieces == '{"city": "Paris"}'


async def test_a_failure_mid_stream_is_anthropics_error_event(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream]
) -> None:
    url, _ = scripted
    proxy = await _proxy(make_client, url, "truncated")
    events = named_events(await (await proxy.post("/v1/messages", json=_small(stream=True))).text())
    assert events[-1] == {
        "type": "error",
        "error": {"type": "api_error", "message": "The upstream stream ended before [DONE]"},
    }


async def test_count_tokens_through_the_gateway_asks_the_engines_tokenizer(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream]
) -> None:
    url, seen = scripted
    proxy = await _proxy(make_client, url, "vllm")
    body = {"model": PROXIED, "messages": [{"role": "user", "content": "Hello"}]}
    counted = await proxy.post("/v1/messages/count_tokens", json=body)
    assert await counted.json() == {"input_tokens": 3}
    assert seen.bodies[-1]["messages"] == [{"role": "user", "content": "Hello"}] and seen.bodies[-1]["model"] == "vllm"


async def test_an_engine_that_serves_messages_itself_gets_the_request_as_it_came(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream]
) -> None:
    url, seen = scripted
    proxy = await make_client(
        backend="openai",
        upstream_url=url + "/v1",
        model_id=PROXIED,
        upstream_model="vllm",
        upstream_native_apis="messages",
    )
    sent = _small(container="c1", cache_control={"type": "ephemeral"})
    whole = await (await proxy.post("/v1/messages", json=sent)).json()
    assert seen.bodies[-1] == {**sent, "model": "vllm"}
    assert whole["model"] == PROXIED and whole["content"] == NATIVE_MESSAGE["content"]
    assert (whole["metrics"]["prompt_tokens"], whole["metrics"]["completion_tokens"]) == (5, 2)
    events = named_events(await (await proxy.post("/v1/messages", json=_small(stream=True))).text())
    assert [e["type"] for e in events] == [e["type"] for e in NATIVE_MESSAGE_EVENTS]
    assert events[0]["message"]["model"] == PROXIED
    figures = events[-2]["metrics"]
    assert figures["time_to_first_token_ms"] is not None and figures["cached_prompt_tokens"] == 1
    counted = await proxy.post("/v1/messages/count_tokens", json={"model": PROXIED, "messages": sent["messages"]})
    assert await counted.json() == {"input_tokens": 5} and seen.bodies[-1]["model"] == "vllm"
