"""Tool calls on the embedded engine: tools rendered by the model's template, calls constrained to the functions'
schemas, read back into ``tool_calls`` (whole and streamed the way OpenAI streams them), and a full loop.

The bundled model's template follows the Hermes/Qwen convention. Its weights are random, so what is asserted is
what any model must give under ``required`` or a named choice: a call of a listed function whose arguments follow
its schema. With ``parallel_tool_calls`` left on, a random model may go on calling until ``max_tokens``; the
tests that need an answer to end on its own ask for one call.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from genai_server.embedded.call_arguments import CHECK_BUDGET, ArgumentCheck
from genai_server.embedded.tool_calls import HERMES, LLAMA3_JSON, PHI4_MINI, CallFormat, CallReader
from genai_server.settings import BUNDLED_MODEL
from tests.harness.bodies import chat_body
from tests.harness.in_process import ClientFactory
from tests.harness.responses import stream_chunks

WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time"}},
]


def _tools_body(**extra: Any) -> dict[str, Any]:
    return chat_body("What is the weather in Paris?", max_tokens=300, tools=TOOLS, **extra)


def _check_call(call: dict[str, Any]) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_")
    arguments = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        jsonschema.validate(arguments, WEATHER)
    else:
        assert (call["function"]["name"], arguments) == ("get_time", {})


async def test_required_gives_calls_that_follow_their_schema(client: Any, openai_schema: Any) -> None:
    for prompt in ["What is the weather in Paris?", "Hello", "Tell me a long story"]:
        body = {
            **_tools_body(tool_choice="required", parallel_tool_calls=False),
            "messages": [{"role": "user", "content": prompt}],
        }
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
        openai_schema("CreateChatCompletionResponse", answer)
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        _check_call(call)


async def test_a_named_function_is_the_one_called(client: Any) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    answer = await (await client.post("/v1/chat/completions", json=_tools_body(tool_choice=choice))).json()
    calls = answer["choices"][0]["message"]["tool_calls"]
    assert calls and {c["function"]["name"] for c in calls} == {"get_time"}
    for call in calls:
        _check_call(call)


async def test_parallel_calls_are_each_a_valid_call(client: Any) -> None:
    answer = await (await client.post("/v1/chat/completions", json=_tools_body(tool_choice="required"))).json()
    calls = answer["choices"][0]["message"]["tool_calls"]
    assert len(calls) >= 1
    for call in calls:
        _check_call(call)
    assert len({c["id"] for c in calls}) == len(calls)


async def test_streamed_calls_are_the_whole_answer_in_openai_pieces(client: Any, openai_schema: Any) -> None:
    body = _tools_body(tool_choice="required", parallel_tool_calls=False)
    whole = (await (await client.post("/v1/chat/completions", json=body)).json())["choices"][0]
    resp = await client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = stream_chunks(await resp.text())
    for chunk in chunks:
        openai_schema("CreateChatCompletionStreamResponse", chunk)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"  # with the first generated content: the call
    assert "content" not in deltas[0]
    header, arguments = deltas[0]["tool_calls"][0], deltas[1]["tool_calls"][0]
    assert header["index"] == 0 and header["type"] == "function" and header["function"]["arguments"] == ""
    assert arguments == {"index": 0, "function": {"arguments": arguments["function"]["arguments"]}}
    expected = whole["message"]["tool_calls"][0]["function"]
    assert (header["function"]["name"], arguments["function"]["arguments"]) == (expected["name"], expected["arguments"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_tool_choice_none_shows_the_tools_and_calls_nothing(client: Any) -> None:
    plain = await (await client.post("/v1/chat/completions", json=chat_body("What is the weather in Paris?"))).json()
    answer = await (await client.post("/v1/chat/completions", json=_tools_body(tool_choice="none"))).json()
    assert answer["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]  # the tools are in the prompt
    choice = answer["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] in ("stop", "length")


async def test_auto_answers_with_text_that_is_not_a_call_or_with_calls(client: Any) -> None:
    for prompt in ["Hello", "What is the weather in Paris?", "Tell me a long story"]:
        body = {**_tools_body(), "messages": [{"role": "user", "content": prompt}]}
        message = (await (await client.post("/v1/chat/completions", json=body)).json())["choices"][0]["message"]
        if message.get("tool_calls"):
            for call in message["tool_calls"]:
                _check_call(call)
        else:
            assert not message["content"].lstrip().startswith("<tool_call>")


async def test_a_whole_tool_loop_renders_calls_and_results_with_the_template(client: Any, tokenizer: Any) -> None:
    first = await (
        await client.post("/v1/chat/completions", json=_tools_body(tool_choice="required", parallel_tool_calls=False))
    ).json()
    message = first["choices"][0]["message"]
    (call,) = message["tool_calls"]
    history = [
        {"role": "user", "content": "What is the weather in Paris?"},
        message,
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 21}'},
    ]
    second = await client.post("/v1/chat/completions", json={**_tools_body(), "messages": history})
    assert second.status == 200, await second.text()
    rendered = tokenizer.apply_chat_template(
        json.dumps(
            [
                history[0],
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": call["id"],
                            "type": "function",
                            "function": {
                                "name": call["function"]["name"],
                                "arguments": json.loads(call["function"]["arguments"]),
                            },
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 21}'},
            ]
        ),
        tools=json.dumps(TOOLS),
        add_generation_prompt=True,
    )
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in rendered
    assert f'<tool_call>\n{{"name": "{call["function"]["name"]}", "arguments": ' in rendered
    assert (await second.json())["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered))


async def test_a_template_without_tools_gets_them_in_the_system_message(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "chatml-only"
    shutil.copytree(BUNDLED_MODEL, folder)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    client = await make_client(model_path=folder)
    body = {**_tools_body(tool_choice="required", parallel_tool_calls=False), "model": folder.name}
    plain = await (await client.post("/v1/chat/completions", json={**body, "tool_choice": "none"})).json()
    answer = await (await client.post("/v1/chat/completions", json=body)).json()
    assert answer["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    (call,) = answer["choices"][0]["message"]["tool_calls"]
    _check_call(call)
    history = [
        body["messages"][0],
        answer["choices"][0]["message"],
        {"role": "tool", "content": "21", "tool_call_id": call["id"]},
    ]
    resp = await client.post("/v1/chat/completions", json={**body, "messages": history, "tool_choice": "auto"})
    assert resp.status == 200, await resp.text()


async def test_a_schema_the_engine_cannot_compile_is_a_400_naming_tools(client: Any) -> None:
    broken = [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}]
    resp = await client.post("/v1/chat/completions", json=chat_body(tools=broken, tool_choice="required"))
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "tools"
    assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200


# ---- the reader, for each convention -----------------------------------------------------------------------


def _read_in_pieces(fmt: CallFormat, text: str, size: int) -> tuple[str, list[tuple[str, str]]]:
    reader, content, calls = CallReader(fmt), [], []
    for at in range(0, len(text), size):
        piece, found = reader.feed(text[at : at + size])
        content.append(piece)
        calls.extend(found)
    rest, found = reader.finish()
    return "".join(content) + rest, [(c.name, c.arguments) for c in calls + found]


@pytest.mark.parametrize(
    ("fmt", "text", "content", "calls"),
    [
        (
            HERMES,
            'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n',
            "Let me look.\n",
            [("f", '{"a": 1}')],
        ),
        (
            HERMES,
            '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": '
            '{"b": "x"}}\n</tool_call>',
            "",
            [("f", "{}"), ("g", '{"b": "x"}')],
        ),
        (HERMES, "<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
        # Cut off by max_tokens: neither a call nor the answer (issue 19: it reached clients as markup), dropped.
        (HERMES, 'Sure.\n<tool_call>\n{"name": "f", "argu', "Sure.\n", []),
        (HERMES, "a < b <tool", "a < b <tool", []),
        (
            PHI4_MINI,
            'functools[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]',
            "",
            [("f", '{"a": 1}'), ("g", "{}")],
        ),
        (PHI4_MINI, "fun facts", "fun facts", []),
        (
            LLAMA3_JSON,
            '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}',
            "",
            [("f", '{"a": 1}'), ("g", "{}")],
        ),
        (LLAMA3_JSON, "{not a call", "{not a call", []),
        (LLAMA3_JSON, "Plain text", "Plain text", []),
    ],
)
def test_the_reader_finds_calls_however_the_text_is_split(
    fmt: CallFormat, text: str, content: str, calls: list[tuple[str, str]]
) -> None:
    for size in (1, 2, 5, len(text)):
        assert _read_in_pieces(fmt, text, size) == (content, calls)


async def test_auto_with_a_response_format_answers_in_that_format_or_calls(client: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    for prompt in ["Hello", "Tell me a long story"]:
        body = {**_tools_body(response_format=fmt), "messages": [{"role": "user", "content": prompt}]}
        choice = (await (await client.post("/v1/chat/completions", json=body)).json())["choices"][0]
        if choice["message"].get("tool_calls"):
            for call in choice["message"]["tool_calls"]:
                _check_call(call)
        else:
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)


async def test_seeded_sampling_and_logprobs_keep_calls_valid_and_repeatable(client: Any) -> None:
    """Both run on a Generator of their own (``scheduler.py``): the grammar must hold there too."""
    body = _tools_body(tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=7, logprobs=True)
    first, again = [
        (await (await client.post("/v1/chat/completions", json=body)).json())["choices"][0] for _ in range(2)
    ]
    (call,) = first["message"]["tool_calls"]
    _check_call(call)
    assert first["logprobs"]["content"] and all(e["logprob"] <= 0 for e in first["logprobs"]["content"])
    assert [c["function"] for c in again["message"]["tool_calls"]] == [call["function"]]


@pytest.mark.parametrize("fmt", [HERMES, PHI4_MINI, LLAMA3_JSON], ids=lambda fmt: fmt.name)
def test_a_call_to_a_function_not_offered_is_never_a_call(fmt: CallFormat) -> None:
    """With ``auto`` a call written after some text is outside the grammar: whatever name the model writes, only a
    function the client declared comes back as a call; any other stays the model's text."""
    offered = {"f": ArgumentCheck(None)}
    written = fmt.write([{"name": "rm_rf", "arguments": {"path": "/"}}])
    reader = CallReader(fmt, offered)
    text, calls = reader.feed(("I will act.\n" if fmt.after_text else "") + written)
    rest, more = reader.finish()
    assert calls + more == []
    assert "rm_rf" in text + rest
    declared = CallReader(fmt, offered)
    found = declared.feed(fmt.write([{"name": "f", "arguments": {"a": 1}}]))[1] + declared.finish()[1]
    assert [(call.name, call.arguments) for call in found] == [("f", '{"a": 1}')]


_WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "pattern": "^(a|aa)+$"}, "days": {"type": "integer", "maximum": 7}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("arguments", "is_call"),
    [
        ({"city": "aaa", "days": 3}, True),
        ({"city": "aaa", "days": 30}, False),  # past the schema's maximum
        ({"days": 3}, False),  # a required property missing
        ({"city": "aaa", "extra": 1}, False),  # a property the schema does not allow
        ({"city": "a" * 40 + "b"}, False),  # a pattern that backtracks for ever in Python's re: RE2 answers at once
    ],
    ids=["fits", "maximum", "required", "additional", "backtracking-pattern"],
)
def test_a_call_after_text_is_a_call_only_if_its_arguments_fit_the_schema(arguments: Any, is_call: bool) -> None:
    """After some text a call is outside the tool grammar (``auto``): its arguments are checked before it is
    returned as one; one that does not fit stays the model's text. The same call at the start (under the grammar,
    which keeps it to the schema) is not checked again."""
    functions = {"weather": ArgumentCheck(_WEATHER)}
    written = HERMES.write([{"name": "weather", "arguments": arguments}])
    reader = CallReader(HERMES, functions)
    text, calls = reader.feed("Let me look.\n" + written)
    rest, more = reader.finish()
    assert [c.name for c in calls + more] == (["weather"] if is_call else [])
    assert ("weather" in text + rest) is not is_call
    first = CallReader(HERMES, functions)
    assert [c.name for c in first.feed(written)[1] + first.finish()[1]] == ["weather"]


def test_arguments_too_large_to_check_in_bounded_time_are_not_vouched_for() -> None:
    """The check's cost grows with schema size times arguments size: past a budget it is not made (the event loop
    would stall), and the call is not returned as one."""
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(200)}}
    check = ArgumentCheck(schema)
    assert check({"p0": "x"})
    assert not check({"p0": "x" * (CHECK_BUDGET // len(json.dumps(schema)) + 1)})


@pytest.mark.parametrize("fmt", [PHI4_MINI, LLAMA3_JSON], ids=lambda fmt: fmt.name)
def test_a_whole_answer_call_cut_by_max_tokens_is_dropped(fmt: CallFormat) -> None:
    written = fmt.write([{"name": "f", "arguments": {"a": 1}}])
    reader = CallReader(fmt, {"f": ArgumentCheck(None)})
    text, calls = reader.feed(written[: len(written) - 4])
    assert reader.finish(cut=True) == ("", []) and (text, calls) == ("", [])


@pytest.mark.parametrize("max_tokens", [4, 12, 24])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_call_cut_by_max_tokens_never_reaches_the_client_as_markup(
    client: Any, stream: bool, max_tokens: int
) -> None:
    """``required`` makes the whole answer a call; a few tokens cut it (in its opening marker, or in its JSON). It is
    neither a call nor an answer: dropped, and the choice ends with ``length`` (it came back as raw template markup
    in ``content``, which an agent SDK returned as its final answer)."""
    body = {**_tools_body(tool_choice="required", stream=stream), "max_tokens": max_tokens}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()
    if stream:
        chunks = [c for c in stream_chunks(await resp.text()) if c["choices"]]
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        calls = [c for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
        finish = chunks[-1]["choices"][0]["finish_reason"]
    else:
        choice = (await resp.json())["choices"][0]
        content, calls, finish = (
            choice["message"]["content"] or "",
            choice["message"].get("tool_calls") or [],
            choice["finish_reason"],
        )
    assert finish == "length"
    assert calls == []
    assert content == ""
