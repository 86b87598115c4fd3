"""OpenAI's Responses API (``/v1/responses``) through the clients that speak it: the ``openai`` SDK's create,
stream and parse, a function-tool loop continued with ``previous_response_id``, the ``openai-agents`` SDK's default
``Agent`` and LangChain's ``use_responses_api``; its event sequence checked against the official schemas; the store's
owner and bounds; bad input; and the same API through the gateway in front of a scripted engine.

Structured outputs use enum-only strict schemas so that even the random bundled model ends each answer on its own.
"""

from __future__ import annotations

from typing import Any, Literal

import agents
import openai
import pytest
from aiohttp.test_utils import TestClient
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.harness.bodies import MODEL_ID
from tests.harness.in_process import ClientFactory
from tests.harness.openai_spec import RESPONSES_SPEC, schema_validator
from tests.harness.responses import named_events
from tests.harness.upstream import NATIVE_RESPONSE, NATIVE_RESPONSE_EVENTS, ScriptedUpstream

# A short answer the model ends on its own (the schema admits nothing else).
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}, "unit": {"type": "string", "enum": ["C"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_FORMAT: Any = {"format": {"type": "json_schema", "name": "weather", "schema": WEATHER_SCHEMA, "strict": True}}
WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
# Each event type the server sends, and the official schema it must follow.
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
    "response.reasoning_text.done": "ResponseReasoningTextDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "error": "ResponseErrorEvent",
}
PROXIED = "proxied-model"


class Weather(BaseModel):
    """The weather in a city."""

    city: Literal["Paris", "Oslo"]
    unit: Literal["C"]


@pytest.fixture(scope="module")
def responses_schema() -> Any:
    return schema_validator(RESPONSES_SPEC)


def _check_events(events: list[dict[str, Any]], validate: Any) -> None:
    """Every event follows its official schema, numbered in order from 0; created first, one terminal event last."""
    for event in events:
        validate(EVENT_SCHEMAS[event["type"]], event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    terminal = {"response.completed", "response.incomplete", "response.failed"}
    assert events[-1]["type"] in terminal and not any(e["type"] in terminal for e in events[:-1])


# ---- the openai SDK on the embedded engine ---------------------------------------------------------------------


async def test_create_answers_with_a_response_object_its_usage_and_our_figures(
    oai: openai.AsyncOpenAI, responses_schema: Any
) -> None:
    response = await oai.responses.create(
        model=MODEL_ID,
        input="What is the weather in Paris?",
        text=WEATHER_FORMAT,
        temperature=0,
    )
    assert response.status == "completed"
    assert Weather.model_validate_json(response.output_text)
    responses_schema("Response", response.model_dump(mode="json", by_alias=True, exclude_unset=True))
    usage = response.usage
    assert usage is not None and usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    figures = (response.model_extra or {})["metrics"]
    assert figures["prompt_tokens"] == usage.input_tokens and figures["completion_tokens"] == usage.output_tokens
    assert figures["time_to_first_token_ms"] > 0


async def test_parse_and_stream_give_the_same_kind_of_answer(oai: openai.AsyncOpenAI) -> None:
    parsed = await oai.responses.parse(
        model=MODEL_ID, input="What is the weather in Paris?", text_format=Weather, temperature=0
    )
    assert isinstance(parsed.output_parsed, Weather)
    async with oai.responses.stream(
        model=MODEL_ID, input="What is the weather in Oslo?", text_format=Weather, temperature=0
    ) as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert isinstance(final.output_parsed, Weather)
    assert "".join(deltas) == final.output_text
    assert final.usage is not None and final.usage.output_tokens >= len(deltas) > 0


async def test_the_stream_follows_the_official_event_schemas(make_client: ClientFactory, responses_schema: Any) -> None:
    client = await make_client()
    body = {"model": MODEL_ID, "input": "Hello", "stream": True, "max_output_tokens": 6, "temperature": 0}
    resp = await client.post("/v1/responses", json=body)
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    events = named_events(await resp.text())
    _check_events(events, responses_schema)
    # Six tokens and no end of its own: the token limit ends it, and says so.
    last = events[-1]["response"]
    assert events[-1]["type"] == "response.incomplete"
    assert last["incomplete_details"] == {"reason": "max_output_tokens"} and last["usage"]["output_tokens"] == 6
    assert last["metrics"]["completion_tokens"] == 6
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert last["output"][0]["content"][0]["text"] == text


async def test_a_function_tool_loop_continued_by_previous_response_id(
    oai: openai.AsyncOpenAI, responses_schema: Any
) -> None:
    first = await oai.responses.create(
        model=MODEL_ID,
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.arguments
    responses_schema("Response", first.model_dump(mode="json", by_alias=True, exclude_unset=True))
    second = await oai.responses.create(
        model=MODEL_ID,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21 C and sunny"}],
        text=WEATHER_FORMAT,
        temperature=0,
    )
    assert second.previous_response_id == first.id
    assert Weather.model_validate_json(second.output_text)
    # The conversation went on: the first turn and its call are in the prompt, beside the call's output.
    alone = await oai.responses.create(
        model=MODEL_ID, input=[{"role": "user", "content": "21 C and sunny"}], max_output_tokens=1
    )
    assert second.usage is not None and first.usage is not None and alone.usage is not None
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens


async def test_a_continued_conversation_reuses_the_kept_kv_cache(oai: openai.AsyncOpenAI) -> None:
    """As a chat continuation does: the previous turn's prompt and reply are not prefilled again, when the reply's
    text tokenises back to the tokens generated (short replies of the random model often do; some seeds tried)."""
    for seed in (f"Story number {i} about a {w}" for i, w in enumerate(["river", "cat", "storm", "lamp"] * 3)):
        first = await oai.responses.create(model=MODEL_ID, input=seed, max_output_tokens=2, temperature=0)
        second = await oai.responses.create(
            model=MODEL_ID, input=" And then?", previous_response_id=first.id, max_output_tokens=2, temperature=0
        )
        assert first.usage is not None and second.usage is not None
        # All but the reply's last token, which was sampled and never run through the model; or, when the reply's
        # text does not tokenise back to the tokens generated, the part before it or nothing.
        reusable = first.usage.input_tokens + first.usage.output_tokens - 1
        cached = second.usage.input_tokens_details.cached_tokens
        assert cached <= reusable, (cached, reusable)
        if cached == reusable:
            return
    raise AssertionError("no continued response reused the kept conversation")


async def test_top_logprobs_come_back_on_the_output_text(make_client: ClientFactory, responses_schema: Any) -> None:
    client = await make_client()
    whole = await (await client.post("/v1/responses", json=_small(top_logprobs=2))).json()
    part = whole["output"][0]["content"][0]
    assert len(part["logprobs"]) == whole["usage"]["output_tokens"] == 6
    assert all(len(entry["top_logprobs"]) == 2 for entry in part["logprobs"])
    raw = bytes(byte for entry in part["logprobs"] for byte in entry["bytes"])
    assert raw.decode("utf-8", "replace") == part["text"]  # the tokens' bytes rebuild the answer
    events = named_events(await (await client.post("/v1/responses", json=_small(top_logprobs=2, stream=True))).text())
    _check_events(events, responses_schema)
    streamed = [entry for e in events if e["type"] == "response.output_text.delta" for entry in e["logprobs"]]
    assert [entry["token"] for entry in streamed] == [entry["token"] for entry in part["logprobs"]]


# ---- the store ---------------------------------------------------------------------------------------------------


async def test_kept_responses_are_read_and_deleted_by_their_own_key_only(make_client: ClientFactory) -> None:
    client = await make_client(api_keys="key-a,key-b")
    a, b = ({"Authorization": f"Bearer {key}"} for key in ("key-a", "key-b"))
    created = await (await client.post("/v1/responses", json=_small(), headers=a)).json()
    kept = await client.get(f"/v1/responses/{created['id']}", headers=a)
    assert kept.status == 200 and (await kept.json())["output"] == created["output"]
    for method in ("GET", "DELETE"):  # another key's: as if it did not exist
        other = await client.request(method, f"/v1/responses/{created['id']}", headers=b)
        assert other.status == 404 and (await other.json())["error"]["code"] == "response_not_found"
    continued = await client.post("/v1/responses", json=_small(previous_response_id=created["id"]), headers=b)
    assert continued.status == 400
    assert (await continued.json())["error"]["param"] == "previous_response_id"
    deleted = await client.delete(f"/v1/responses/{created['id']}", headers=a)
    assert await deleted.json() == {"id": created["id"], "object": "response", "deleted": True}
    assert (await client.get(f"/v1/responses/{created['id']}", headers=a)).status == 404


async def test_the_store_keeps_the_most_recently_used_within_its_bounds(make_client: ClientFactory) -> None:
    client = await make_client(responses_store_max_items=2)
    ids = [(await (await client.post("/v1/responses", json=_small())).json())["id"] for _ in range(2)]
    assert (await client.get(f"/v1/responses/{ids[0]}")).status == 200  # read: now the most recently used
    third = (await (await client.post("/v1/responses", json=_small())).json())["id"]
    assert [(await client.get(f"/v1/responses/{i}")).status for i in (*ids, third)] == [200, 404, 200]
    unkept = (await (await client.post("/v1/responses", json=_small(store=False))).json())["id"]
    assert (await client.get(f"/v1/responses/{unkept}")).status == 404


async def test_a_response_larger_than_the_store_is_not_kept(make_client: ClientFactory) -> None:
    client = await make_client(responses_store_max_mb=0.001)  # ~1 KB: smaller than any response
    created = await (await client.post("/v1/responses", json=_small())).json()
    assert (await client.get(f"/v1/responses/{created['id']}")).status == 404


# ---- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"input": None}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"type": "web_search_call"}]}, "input.0.type"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input.0.role"),
        ({"input": [{"type": "function_call", "call_id": 1, "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": {"x": 1}}]}, "input.0.output"),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input.0.content.0.text"),
        ({"max_output_tokens": 10**9}, "max_output_tokens"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        ({"tools": [{"type": "function"}]}, "tools.0.name"),
        ({"previous_response_id": "resp_nonesuch"}, "previous_response_id"),
        ({"temperature": 9}, "temperature"),
        (
            {"tools": [{**WEATHER_TOOL, "parameters": {"type": "integer", "maximum": 2**70}}]},
            "tools.0.parameters.maximum",
        ),
    ],
)
async def test_bad_input_is_a_400_naming_the_responses_parameter(
    client: TestClient[Any, Any], change: dict[str, Any], param: str
) -> None:
    resp = await client.post("/v1/responses", json=_small(**change))
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and isinstance(error["code"], str)


async def test_the_sdk_raises_its_own_errors(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        await oai.responses.create(model=MODEL_ID, input="Hi", max_output_tokens=10**9)
    with pytest.raises(openai.NotFoundError):
        await oai.responses.create(model="no-such-model", input="Hi")
    with pytest.raises(openai.NotFoundError):
        await oai.responses.retrieve("resp_nonesuch")


# ---- agent frameworks --------------------------------------------------------------------------------------------


async def test_the_agents_sdk_default_agent_calls_a_tool_and_gives_structured_output(
    oai: openai.AsyncOpenAI,
) -> None:
    agents.set_tracing_disabled(True)
    model = agents.OpenAIResponsesModel(model=MODEL_ID, openai_client=oai)
    called: list[str] = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Oslo"]) -> str:
        """The weather now in a city."""
        called.append(city)
        return f"21 C in {city}"

    caller = agents.Agent(
        name="caller",
        model=model,
        tools=[get_weather],
        tool_use_behavior="stop_on_first_tool",
        model_settings=agents.ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0),
    )
    result = await agents.Runner.run(caller, "What is the weather in Paris?")
    assert called and result.final_output == f"21 C in {called[0]}"

    reporter = agents.Agent(
        name="reporter", model=model, output_type=Weather, model_settings=agents.ModelSettings(temperature=0)
    )
    report = await agents.Runner.run(reporter, "What is the weather in Oslo?")
    assert isinstance(report.final_output, Weather)


async def test_langchain_speaks_the_responses_api(base_url: str) -> None:
    model = ChatOpenAI(base_url=base_url, api_key="unused", model=MODEL_ID, temperature=0, use_responses_api=True)

    @tool
    def get_weather(city: Literal["Paris", "Oslo"]) -> str:
        """The weather now in a city."""
        return f"21 C in {city}"

    structured = await model.with_structured_output(Weather, method="json_schema", strict=True).ainvoke(
        "What is the weather in Paris?"
    )
    assert isinstance(structured, Weather)
    bound = model.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False, strict=True)
    called = await bound.ainvoke("Weather in Oslo?")
    (call,) = called.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Oslo")


# ---- through the gateway ---------------------------------------------------------------------------------------


async def _proxy(make_client: ClientFactory, url: str, shape: str) -> TestClient[Any, Any]:
    return await make_client(backend="openai", upstream_url=url + "/v1", model_id=PROXIED, upstream_model=shape)


@pytest.mark.parametrize("shape", ["vllm", "llamacpp", "sglang"])
async def test_the_gateway_translates_to_the_engines_chat_completions(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream], responses_schema: Any, shape: str
) -> None:
    url, seen = scripted
    proxy = await _proxy(make_client, url, shape)
    whole = await (await proxy.post("/v1/responses", json=_small(model=PROXIED, instructions="Be brief"))).json()
    assert whole["output"][0]["content"][0]["text"] == "Hello" and whole["status"] == "completed"
    assert whole["usage"]["input_tokens"] == 5 and whole["usage"]["output_tokens"] == 2
    assert seen.bodies[-1]["messages"] == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Hello"},
    ]
    assert seen.bodies[-1]["max_completion_tokens"] == 6
    streamed = await proxy.post("/v1/responses", json=_small(model=PROXIED, stream=True))
    events = named_events(await streamed.text())
    _check_events(events, responses_schema)
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hello"
    assert events[-1]["response"]["metrics"]["time_to_first_token_ms"] is not None


@pytest.mark.parametrize("shape", ["reasoning", "reasoning-named"])
async def test_an_engines_reasoning_becomes_a_reasoning_item(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream], responses_schema: Any, shape: str
) -> None:
    url, _ = scripted
    proxy = await _proxy(make_client, url, shape)
    whole = await (await proxy.post("/v1/responses", json=_small(model=PROXIED))).json()
    assert [item["type"] for item in whole["output"]] == ["reasoning", "message"]
    assert whole["output"][0]["content"] == [{"type": "reasoning_text", "text": "Thinking."}]
    events = named_events(await (await proxy.post("/v1/responses", json=_small(model=PROXIED, stream=True))).text())
    _check_events(events, responses_schema)
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert reasoning == "Thinking." and events[-1]["response"]["output"][1]["content"][0]["text"] == "Hello"


async def test_an_engines_tool_call_becomes_a_function_call_item_and_the_loop_goes_on(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream], responses_schema: Any
) -> None:
    url, seen = scripted
    proxy = await _proxy(make_client, url, "tool-call")
    events = named_events(
        await (await proxy.post("/v1/responses", json=_small(model=PROXIED, stream=True, tools=[WEATHER_TOOL]))).text()
    )
    _check_events(events, responses_schema)
    arguments = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert arguments == '{"city": "Paris"}'
    (call,) = events[-1]["response"]["output"]
    assert call == {
        **call,
        "type": "function_call",
        "call_id": "call_up1",
        "name": "get_weather",
        "arguments": arguments,
    }
    assert seen.bodies[-1]["tools"] == [
        {"type": "function", "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters", "strict")}}
    ]
    output = {"type": "function_call_output", "call_id": "call_up1", "output": "21 C"}
    nxt = await proxy.post(
        "/v1/responses", json=_small(model=PROXIED, previous_response_id=events[-1]["response"]["id"], input=[output])
    )
    assert nxt.status == 200, await nxt.text()
    assert seen.bodies[-1]["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_up1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_up1", "content": "21 C"},
    ]


async def test_a_failure_mid_stream_ends_with_response_failed(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream], responses_schema: Any
) -> None:
    url, _ = scripted
    proxy = await _proxy(make_client, url, "truncated")
    events = named_events(await (await proxy.post("/v1/responses", json=_small(model=PROXIED, stream=True))).text())
    _check_events(events, responses_schema)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == "upstream_error"  # ours; the response's is one of the codes OpenAI defines
    assert events[-1]["response"]["error"]["code"] == "server_error"


def _small(**change: Any) -> dict[str, Any]:
    body = {"model": MODEL_ID, "input": "Hello", "max_output_tokens": 6, "temperature": 0, **change}
    return {k: v for k, v in body.items() if v is not None}


# ---- relayed as it is, to an engine that serves the Responses API itself ----------------------------------------


async def test_an_engine_that_serves_responses_itself_gets_the_request_as_it_came(
    make_client: ClientFactory, scripted: tuple[str, ScriptedUpstream], responses_schema: Any
) -> None:
    url, seen = scripted
    proxy = await make_client(
        backend="openai",
        upstream_url=url + "/v1",
        model_id=PROXIED,
        upstream_model="vllm",
        upstream_native_apis="responses",
        api_keys="key-a,key-b",
    )
    a, b = ({"Authorization": f"Bearer {key}"} for key in ("key-a", "key-b"))
    # What the translation would refuse or not know goes to the engine untouched: it decides.
    sent = _small(model=PROXIED, tools=[{"type": "web_search"}], include=["reasoning.encrypted_content"])
    whole = await proxy.post("/v1/responses", json=sent, headers=a)
    answer = await whole.json()
    assert seen.bodies[-1] == {**sent, "model": "vllm"}
    assert answer["model"] == PROXIED and answer["output"] == NATIVE_RESPONSE["output"]
    assert answer["metrics"]["prompt_tokens"] == 5 and answer["metrics"]["completion_tokens"] == 2
    assert "x-total-time" in whole.headers

    streamed = await proxy.post("/v1/responses", json=_small(model=PROXIED, stream=True), headers=a)
    events = named_events(await streamed.text())
    assert [e["type"] for e in events] == [e["type"] for e in NATIVE_RESPONSE_EVENTS]
    assert events[0]["response"]["model"] == PROXIED
    figures = events[-1]["response"]["metrics"]
    assert figures["time_to_first_token_ms"] is not None and figures["cached_prompt_tokens"] == 1
    assert (figures["prompt_tokens"], figures["completion_tokens"]) == (5, 2)

    # The engine keeps the response; this server keeps whose it is.
    kept = f"/v1/responses/{NATIVE_RESPONSE['id']}"
    assert (await proxy.get(kept, headers=b)).status == 404 and seen.kept == []
    refused = await proxy.post("/v1/responses", json=_small(model=PROXIED, previous_response_id="resp_up1"), headers=b)
    assert refused.status == 400
    continued = await proxy.post(
        "/v1/responses", json=_small(model=PROXIED, previous_response_id="resp_up1"), headers=a
    )
    assert continued.status == 200 and seen.bodies[-1]["previous_response_id"] == "resp_up1"
    got = await proxy.get(kept, headers=a)
    assert got.status == 200 and (await got.json())["model"] == PROXIED
    assert (await proxy.delete(kept, headers=a)).status == 200
    assert seen.kept == [("GET", kept), ("DELETE", kept)]
    assert (await proxy.get(kept, headers=a)).status == 404
    # Relayed as it came, still within the server's limits: refused before the engine sees it.
    sent_before = len(seen.bodies)
    too_long = await proxy.post("/v1/responses", json=_small(model=PROXIED, max_output_tokens=10**6), headers=a)
    assert too_long.status == 400 and (await too_long.json())["error"]["param"] == "max_output_tokens"
    assert len(seen.bodies) == sent_before
