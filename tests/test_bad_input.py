"""Bad input: each a 4xx OpenAI error envelope, and the server keeps serving."""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness.bodies import MODEL_ID, chat_body
from tests.harness.in_process import embedded_engine

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
MSG = [{"role": "user", "content": "hi"}]

# (body, expected status, expected code, expected param)
BAD_CHAT_BODIES: list[tuple[Any, int, str, str | None]] = [
    ({"model": MODEL_ID}, 400, "missing_parameter", "messages"),
    ({"messages": MSG}, 400, "missing_parameter", "model"),
    ({"model": MODEL_ID, "messages": []}, 400, "invalid_parameter", "messages"),
    ({"model": MODEL_ID, "messages": "hi"}, 400, "invalid_parameter", "messages"),
    (
        {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "invalid_parameter",
        "messages.0.role",
    ),
    ({"model": MODEL_ID, "messages": [{"role": "user"}]}, 400, "missing_parameter", "messages.0.content"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_parameter", "messages.0.content"),
    (
        {"model": MODEL_ID, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "invalid_parameter",
        "messages.0.content.0.type",
    ),
    ({"model": MODEL_ID, "messages": MSG, "tool_choice": "required"}, 400, "invalid_parameter", "tool_choice"),
    (
        {"model": MODEL_ID, "messages": MSG, "tools": [TOOL], "tool_choice": {"type": "function", "function": {}}},
        400,
        "invalid_parameter",
        "tool_choice",
    ),
    (
        {
            "model": MODEL_ID,
            "messages": MSG,
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "other"}},
        },
        400,
        "invalid_parameter",
        "tool_choice",
    ),
    ({"model": MODEL_ID, "messages": MSG, "tools": [{"type": "custom"}]}, 400, "unsupported_parameter", "tools.0.type"),
    (
        {"model": MODEL_ID, "messages": MSG, "tools": [{"type": "function", "function": {"name": "a b"}}]},
        400,
        "invalid_parameter",
        "tools.0.function.name",
    ),
    (
        {"model": MODEL_ID, "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]},
        400,
        "missing_parameter",
        "messages.0.tool_calls.0.function.arguments",
    ),
    ({"model": 7, "messages": MSG}, 400, "invalid_parameter", "model"),
    ({"model": MODEL_ID, "messages": MSG, "max_tokens": 0}, 400, "invalid_parameter", "max_tokens"),
    ({"model": MODEL_ID, "messages": MSG, "max_tokens": -5}, 400, "invalid_parameter", "max_tokens"),
    ({"model": MODEL_ID, "messages": MSG, "max_tokens": "ten"}, 400, "invalid_parameter", "max_tokens"),
    ({"model": MODEL_ID, "messages": MSG, "max_tokens": "10"}, 400, "invalid_parameter", "max_tokens"),
    ({"model": MODEL_ID, "messages": MSG, "max_tokens": 2.5}, 400, "invalid_parameter", "max_tokens"),
    ({"model": MODEL_ID, "messages": MSG, "max_tokens": 10**9}, 400, "invalid_parameter", "max_tokens"),
    ({"model": MODEL_ID, "messages": MSG, "max_tokens": 4000}, 400, "context_length_exceeded", "max_tokens"),
    (
        {"model": MODEL_ID, "messages": MSG, "max_completion_tokens": 5000},
        400,
        "invalid_parameter",
        "max_completion_tokens",
    ),
    (
        {"model": MODEL_ID, "messages": MSG, "max_completion_tokens": 0},
        400,
        "invalid_parameter",
        "max_completion_tokens",
    ),
    ({"model": MODEL_ID, "messages": MSG, "temperature": 2.5}, 400, "invalid_parameter", "temperature"),
    ({"model": MODEL_ID, "messages": MSG, "temperature": -0.1}, 400, "invalid_parameter", "temperature"),
    ({"model": MODEL_ID, "messages": MSG, "top_p": 0}, 400, "invalid_parameter", "top_p"),
    ({"model": MODEL_ID, "messages": MSG, "top_p": 1.5}, 400, "invalid_parameter", "top_p"),
    ({"model": MODEL_ID, "messages": MSG, "n": 0}, 400, "invalid_parameter", "n"),
    ({"model": MODEL_ID, "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_parameter", "stop"),
    ({"model": MODEL_ID, "messages": MSG, "stop": ""}, 400, "invalid_parameter", "stop"),
    ({"model": MODEL_ID, "messages": MSG, "stream": "yes"}, 400, "invalid_parameter", "stream"),
    (
        {"model": MODEL_ID, "messages": MSG, "stream_options": {"include_usage": True}},
        400,
        "invalid_parameter",
        "stream_options",
    ),
    ({"model": MODEL_ID, "messages": MSG, "presence_penalty": 1}, 400, "unsupported_parameter", "presence_penalty"),
    ({"model": MODEL_ID, "messages": MSG, "top_logprobs": 2}, 400, "invalid_parameter", "top_logprobs"),
    ({"model": MODEL_ID, "messages": MSG, "min_tokens": 9, "max_tokens": 3}, 400, "invalid_parameter", "min_tokens"),
    ({"model": MODEL_ID, "messages": MSG, "repetition_penalty": 0}, 400, "invalid_parameter", "repetition_penalty"),
    (
        {"model": MODEL_ID, "messages": MSG, "response_format": {"type": "yaml"}},
        400,
        "invalid_parameter",
        "response_format.type",
    ),
    ({"model": MODEL_ID, "messages": MSG, "presence_penalty": 0.5}, 400, "unsupported_parameter", "presence_penalty"),
    ({"model": MODEL_ID, "messages": MSG, "frequency_penalty": 1}, 400, "unsupported_parameter", "frequency_penalty"),
    ({"model": MODEL_ID, "messages": MSG, "logit_bias": {"5": 10}}, 400, "unsupported_parameter", "logit_bias"),
    ({"model": "no-such-model", "messages": MSG}, 404, "model_not_found", "model"),
    ([1, 2, 3], 400, "invalid_json", None),
    ("just a string", 400, "invalid_json", None),
]


async def _still_serving(client: Any) -> None:
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
    assert resp.status == 200


def _check_envelope(body: Any, code: str, param: str | None, openai_schema: Any) -> None:
    openai_schema("ErrorResponse", body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert isinstance(error["code"], str)
    assert error["param"] == param
    assert error["message"]


@pytest.mark.parametrize(("body", "status", "code", "param"), BAD_CHAT_BODIES)
async def test_bad_chat_body(
    client: Any, openai_schema: Any, body: Any, status: int, code: str, param: str | None
) -> None:
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == status
    _check_envelope(await resp.json(), code, param, openai_schema)
    await _still_serving(client)


async def test_bad_input_on_a_stream_is_an_error_before_the_stream(client: Any, openai_schema: Any) -> None:
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True, temperature=9))
    assert resp.status == 400
    assert resp.content_type == "application/json"
    _check_envelope(await resp.json(), "invalid_parameter", "temperature", openai_schema)


async def test_malformed_json(client: Any, openai_schema: Any) -> None:
    resp = await client.post("/v1/chat/completions", data=b'{"model": ', headers={"Content-Type": "application/json"})
    assert resp.status == 400
    _check_envelope(await resp.json(), "invalid_json", None, openai_schema)
    await _still_serving(client)


async def test_invalid_utf8_body(client: Any, openai_schema: Any) -> None:
    resp = await client.post(
        "/v1/chat/completions", data=b'{"model": "\xff"}', headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    _check_envelope(await resp.json(), "invalid_json", None, openai_schema)


async def test_wrong_content_type(client: Any, openai_schema: Any) -> None:
    resp = await client.post(
        "/v1/chat/completions", data="model=x&messages=y", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert resp.status == 415
    _check_envelope(await resp.json(), "unsupported_media_type", None, openai_schema)
    await _still_serving(client)


async def test_too_long_prompt_is_context_length_exceeded(client: Any, openai_schema: Any) -> None:
    long_text = "the quick brown fox jumps " * 1000
    resp = await client.post("/v1/chat/completions", json=chat_body(content=long_text))
    assert resp.status == 400
    _check_envelope(await resp.json(), "context_length_exceeded", "messages", openai_schema)
    resp = await client.post("/v1/completions", json={"model": MODEL_ID, "prompt": long_text})
    assert resp.status == 400
    _check_envelope(await resp.json(), "context_length_exceeded", "prompt", openai_schema)
    await _still_serving(client)


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"model": MODEL_ID}, "missing_parameter", "prompt"),
        ({"model": MODEL_ID, "prompt": ""}, "invalid_parameter", "prompt"),
        ({"model": MODEL_ID, "prompt": []}, "invalid_parameter", "prompt"),
        ({"model": MODEL_ID, "prompt": "hi", "echo": True}, "unsupported_parameter", "echo"),
        ({"model": MODEL_ID, "prompt": [5, 512]}, "invalid_parameter", "prompt"),
        ({"model": MODEL_ID, "prompt": [[1, -1]]}, "invalid_parameter", "prompt"),
        ({"model": MODEL_ID, "prompt": "hi", "best_of": 3}, "unsupported_parameter", "best_of"),
        ({"model": MODEL_ID, "prompt": "hi", "suffix": "end"}, "unsupported_parameter", "suffix"),
    ],
)
async def test_bad_completion_body(client: Any, openai_schema: Any, body: Any, code: str, param: str) -> None:
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["code"], error["param"] is not None and error["param"].startswith(param)) == (code, True)
    await _still_serving(client)


async def test_unknown_fields_are_ignored(client: Any) -> None:
    resp = await client.post(
        "/v1/chat/completions", json=chat_body(max_tokens=2, some_vendor_flag=True, metadata={"a": "b"})
    )
    assert resp.status == 200


async def test_features_left_off_are_accepted(client: Any) -> None:
    resp = await client.post(
        "/v1/chat/completions",
        json=chat_body(
            max_tokens=2,
            logprobs=False,
            presence_penalty=0,
            frequency_penalty=0.0,
            logit_bias={},
            response_format={"type": "text"},
            tool_choice="none",
        ),
    )
    assert resp.status == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/nothing-here", 404, "not_found"),
        ("GET", "/ui/secret.txt", 404, "not_found"),  # only the playground's own files are served
        ("POST", "/v1/models", 405, "method_not_allowed"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
        ("DELETE", "/v1/completions", 405, "method_not_allowed"),
    ],
)
async def test_unknown_routes_and_methods_are_enveloped(
    client: Any, openai_schema: Any, method: str, path: str, status: int, code: str
) -> None:
    resp = await client.request(method, path)
    assert resp.status == status
    _check_envelope(await resp.json(), code, None, openai_schema)


async def test_unexpected_exception_is_a_500_that_leaks_nothing(
    client: Any, openai_schema: Any, caplog: pytest.LogCaptureFixture
) -> None:
    engine: Any = embedded_engine(client.app)  # its methods are replaced to inject faults

    async def broken_chat_prompt(messages: Any, tools: Any) -> list[int]:
        raise RuntimeError("secret internal detail /opt/models")

    engine.chat_prompt = broken_chat_prompt  # fault injection into the tokenizer call, not a replacement engine
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 500
    body = await resp.json()
    _check_envelope(body, "internal_error", None, openai_schema)
    assert body["error"]["type"] == "server_error"
    assert "secret" not in await resp.text()
    assert "secret internal detail" in caplog.text  # the stack trace went to the log
