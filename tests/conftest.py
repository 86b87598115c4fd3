"""Shared fixtures: the real server on the real bundled model, built as a user's process would."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import onnxruntime_genai as og
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from genai_server.app import create_app
from genai_server.settings import BUNDLED_MODEL, Settings

MODEL_ID = BUNDLED_MODEL.name
# A prompt on which the bundled model's greedy output runs ~1970 tokens before the end-of-sequence token
# (most prompts stop within a few hundred): what a test uses to keep a slot or a batch busy.
LONG_PROMPT = "Tell me a long story"
# Kept in the repository (MIT, licence beside it) so the suite needs nothing outside the checkout.
SPEC = Path(__file__).resolve().parent / "openai-spec" / "openai-schemas-subset.json"

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def make_settings(**overrides: Any) -> Settings:
    """Settings as the server would read them, but from explicit values only (no env, no .env)."""
    values: dict[str, Any] = {"log_level": "INFO", "log_format": "text", "cors_origins": "*"}
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
async def make_client(aiohttp_client: Any) -> ClientFactory:
    """Start the real app (model loaded in its cleanup_ctx) with some settings; return a client."""

    async def factory(**overrides: Any) -> TestClient[web.Request, web.Application]:
        client: TestClient[web.Request, web.Application] = await aiohttp_client(create_app(make_settings(**overrides)))
        return client

    return factory


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient[web.Request, web.Application]:
    """A client of the server on the bundled model with default settings."""
    return await make_client()


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The model's own tokenizer, to compute the token counts a client should see."""
    return og.Tokenizer(og.Model(str(BUNDLED_MODEL)))


@pytest.fixture(scope="session")
def openai_schema() -> Callable[[str, Any], None]:
    """Validate a payload against a schema of the official OpenAI API description."""
    document = _nullable_to_json_schema(json.loads(SPEC.read_text()))

    def validate(name: str, payload: Any) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        jsonschema.Draft202012Validator(schema).validate(payload)

    return validate


def _nullable_to_json_schema(node: Any) -> Any:
    """The spec is OpenAPI 3.0: ``nullable: true`` means "or null", which JSON Schema spells differently."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_to_json_schema(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


def chat_body(content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    """A chat request body for the bundled model."""
    body: dict[str, Any] = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
    }
    body.update(extra)
    return body


def long_stream(max_tokens: int = 1900) -> dict[str, Any]:
    """A streaming chat request that keeps generating for ~max_tokens tokens (a slot or batch kept busy)."""
    return chat_body(content=LONG_PROMPT, max_tokens=max_tokens, stream=True)


def assert_same_greedy_text(got: str, expected: str) -> None:
    """Greedy text of a sequence run batched against the same sequence run otherwise (alone, or in a batch
    whose mate was cancelled). Batched arithmetic can flip a late near-tie on some x86-64 CPUs (measured on an
    AMD EPYC: 300-token sequences identical for their first ~700 characters, then not), so what holds on any
    box is a long identical beginning, not the last characters."""
    keep = len(expected) // 2
    assert len(got) >= keep, (got, expected)
    assert got[:keep] == expected[:keep], (got, expected)


def sse_events(raw: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    events = [block.strip() for block in raw.split("\n\n") if block.strip()]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: ") :] for e in events]


def stream_chunks(raw: str) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE body, checking it ends with exactly one ``[DONE]``."""
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    return [json.loads(e) for e in events[:-1]]


def metric_sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in the exposition text."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(part in line for part in wanted.split(",")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels}")
