"""``response_format`` on the embedded engine: the output is JSON, and follows the schema, even from random weights.

The engine constrains decoding with a JSON-schema grammar. A schema bounds what the model may write; where it does
not (any string, any integer), a random model can write until ``max_tokens`` and the answer ends with
``finish_reason: "length"``, truncated, as OpenAI's does. What holds on any box is asserted: an answer that ended
on its own parses, and follows the schema.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema

from tests.harness.bodies import MODEL_ID, chat_body
from tests.harness.in_process import ClientFactory
from tests.harness.responses import stream_chunks

# Every value bounded: a random model cannot write past it, so every answer ends on its own.
BOUNDED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "mood", "ok"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person as JSON.", "Hello", "Tell me a long story"]


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def _content(body: dict[str, Any]) -> str:
    content: str = body["choices"][0]["message"]["content"]
    return content


async def test_json_schema_answers_parse_and_follow_the_schema(client: Any, openai_schema: Any) -> None:
    for prompt in PROMPTS:
        resp = await client.post(
            "/v1/chat/completions",
            json=chat_body(prompt, max_tokens=120, response_format=_schema_format(BOUNDED)),
        )
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        openai_schema("CreateChatCompletionResponse", body)
        assert body["choices"][0]["finish_reason"] == "stop", body
        jsonschema.validate(json.loads(_content(body)), BOUNDED)


async def test_streamed_json_schema_answer_is_the_same_json(client: Any) -> None:
    fmt = _schema_format(BOUNDED)
    whole = await (
        await client.post("/v1/chat/completions", json=chat_body(max_tokens=120, response_format=fmt))
    ).json()
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=120, response_format=fmt, stream=True))
    text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in stream_chunks(await resp.text()) if c["choices"]
    )
    assert json.loads(text) == json.loads(_content(whole))


async def test_json_object_answers_that_end_on_their_own_are_objects(client: Any) -> None:
    """Through /v1/completions too (as vLLM allows). Any object allows any string, which the random model writes
    until max_tokens, so what is certain is the start (an object, no free text or whitespace before it) and that an
    answer which ended on its own is an object."""
    for prompt in ["Give me JSON:", "Hello", "Tell me a long story"]:
        body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 60, "temperature": 0}
        answer = await (
            await client.post("/v1/completions", json={**body, "response_format": {"type": "json_object"}})
        ).json()
        text = answer["choices"][0]["text"]
        assert text.startswith("{"), text  # never free text, never leading whitespace
        if answer["choices"][0]["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)


async def test_sampled_seeded_and_batched_requests_follow_the_schema(client: Any) -> None:
    """Seeded sampling runs on a Generator, the rest in a batch with an unconstrained request beside them."""
    fmt = _schema_format(BOUNDED)
    bodies = [
        chat_body("a", max_tokens=120, response_format=fmt, temperature=1.0, seed=7),
        chat_body("b", max_tokens=120, response_format=fmt, temperature=0.8),
        chat_body("c", max_tokens=120, response_format=fmt),
        chat_body("d", max_tokens=20),
    ]
    answers = await asyncio.gather(*[client.post("/v1/chat/completions", json=b) for b in bodies])
    results = [await a.json() for a in answers]
    for body in results[:3]:
        assert body["choices"][0]["finish_reason"] == "stop", body
        jsonschema.validate(json.loads(_content(body)), BOUNDED)
    assert results[3]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_a_schema_the_engine_cannot_compile_is_400_naming_response_format(
    make_client: ClientFactory, openai_schema: Any
) -> None:
    client = await make_client()
    for schema in ({"type": "nonsense"}, {"$ref": "#/nowhere"}):
        resp = await client.post("/v1/chat/completions", json=chat_body(response_format=_schema_format(schema)))
        assert resp.status == 400
        body = await resp.json()
        openai_schema("ErrorResponse", body)
        assert body["error"]["param"] == "response_format"
    bad = await client.post("/v1/chat/completions", json=chat_body(response_format={"type": "json_schema"}))
    assert bad.status == 400 and (await bad.json())["error"]["param"] == "response_format"
    ok = await client.post("/v1/chat/completions", json=chat_body(response_format={"type": "text"}))
    assert ok.status == 200  # the server still serves


async def test_stop_strings_cut_a_constrained_answer_as_they_cut_any_other(client: Any) -> None:
    """Stop strings are the server's: the constrained text is cut before the stop, which is not returned."""
    fmt = _schema_format(BOUNDED)
    whole = _content(
        await (await client.post("/v1/chat/completions", json=chat_body(max_tokens=120, response_format=fmt))).json()
    )
    cut = await (
        await client.post("/v1/chat/completions", json=chat_body(max_tokens=120, response_format=fmt, stop=['"mood"']))
    ).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert _content(cut) == whole[: whole.index('"mood"')]
