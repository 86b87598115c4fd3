"""Structured output and tool calling through the clients people use: the ``openai`` SDK's parse and stream
helpers, and LangChain's ``with_structured_output`` (all three methods) and a tool-calling round trip.

The schemas bound every value (enums) and are strict (no properties beyond the listed ones: a schema is followed
as written, and an open one lets random weights add keys until max_tokens), so even the random bundled model
ends each answer on its own; what is asserted is what the client hands its user: parsed objects and calls.
"""

from __future__ import annotations

from typing import Any, Literal

import openai
import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.harness.bodies import MODEL_ID


class Weather(BaseModel):
    """The weather in a city."""

    city: Literal["Paris", "Oslo", "Lima"]
    unit: Literal["C", "F"]


@tool
def get_weather(city: Literal["Paris", "Oslo", "Lima"]) -> str:
    """The weather now in a city."""
    return f"21 C and sunny in {city}"


def _chat_model(base_url: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=base_url, api_key="unused", model=MODEL_ID, temperature=0, max_tokens=300)


USER: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


# ---- the openai SDK --------------------------------------------------------------------------------------


async def test_sdk_parses_structured_output_into_a_pydantic_model(oai: openai.AsyncOpenAI) -> None:
    result = await oai.chat.completions.parse(
        model=MODEL_ID, messages=USER, response_format=Weather, temperature=0, max_tokens=300
    )
    assert isinstance(result.choices[0].message.parsed, Weather)


async def test_sdk_tool_loop(oai: openai.AsyncOpenAI) -> None:
    tools = [openai.pydantic_function_tool(Weather, name="get_weather")]
    first = await oai.chat.completions.parse(
        model=MODEL_ID, messages=USER, tools=tools, tool_choice="required", parallel_tool_calls=False, temperature=0
    )
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    (call,) = message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, Weather)
    history = [
        *USER,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "21 C"},
    ]
    second = await oai.chat.completions.create(model=MODEL_ID, messages=history, tools=tools, max_tokens=20)
    assert second.choices[0].message.role == "assistant"


async def test_sdk_stream_helper_assembles_streamed_calls(oai: openai.AsyncOpenAI) -> None:
    tools = [openai.pydantic_function_tool(Weather, name="get_weather")]
    async with oai.chat.completions.stream(
        model=MODEL_ID, messages=USER, tools=tools, tool_choice="required", parallel_tool_calls=False, temperature=0
    ) as stream:
        final = await stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and isinstance(call.function.parsed_arguments, Weather)
    assert final.choices[0].finish_reason == "tool_calls"


# ---- LangChain -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
async def test_langchain_structured_output(base_url: str, method: str) -> None:
    structured = _chat_model(base_url).with_structured_output(Weather, method=method, strict=True)  # type: ignore[arg-type]
    assert isinstance(await structured.ainvoke("What is the weather in Paris?"), Weather)


async def test_langchain_json_mode_gets_json(base_url: str) -> None:
    """json_mode asks for any JSON object and leaves the schema to the prompt, which random weights do not read:
    what the server owes is an object, never free text."""
    structured = _chat_model(base_url).with_structured_output(Weather, method="json_mode", include_raw=True)
    try:
        result: Any = await structured.ainvoke("Answer in JSON with keys city and unit.")
        content = result["raw"].content
    except openai.LengthFinishReasonError as exc:  # the client's verdict on an object cut off at max_tokens
        content = exc.completion.choices[0].message.content
    assert content.startswith("{")


async def test_langchain_tool_calling_round_trip(base_url: str) -> None:
    llm = _chat_model(base_url).bind_tools(
        [get_weather], tool_choice="required", parallel_tool_calls=False, strict=True
    )
    question = HumanMessage("What is the weather in Paris?")
    asked = await llm.ainvoke([question])
    (call,) = asked.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Oslo", "Lima")
    result = ToolMessage(await get_weather.ainvoke(call["args"]), tool_call_id=call["id"])
    answer = await _chat_model(base_url).bind_tools([get_weather], strict=True).ainvoke([question, asked, result])
    assert answer.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")

    merged: AIMessageChunk | None = None
    async for chunk in llm.astream([question]):
        merged = chunk if merged is None else merged + chunk  # type: ignore[assignment]
    assert merged is not None
    (streamed,) = merged.tool_calls
    assert streamed["name"] == "get_weather" and streamed["args"]["city"] in ("Paris", "Oslo", "Lima")
