"""API keys: bearer tokens, 401 in the envelope, health public, metrics public unless protected, never logged."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestServer

from genai_server.app import create_app
from tests.harness.bodies import MODEL_ID, chat_body
from tests.harness.in_process import ClientFactory, make_settings

KEY = "sk-test-0123456789abcdef"
OTHER = "sk-second-key"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_without_keys_the_server_is_open(client: Any) -> None:
    assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200


@pytest.mark.parametrize(
    "headers",
    [{}, _auth("wrong"), {"Authorization": KEY}, {"Authorization": "Basic eA=="}, _auth(KEY[:-1]), _auth(KEY + "x")],
)
async def test_missing_or_wrong_key_is_401(
    make_client: ClientFactory, openai_schema: Any, headers: dict[str, str]
) -> None:
    client = await make_client(api_keys=f"{KEY},{OTHER}")
    for method, path, body in [("POST", "/v1/chat/completions", chat_body()), ("GET", "/v1/models", None)]:
        resp = await client.request(method, path, json=body, headers=headers)
        assert resp.status == 401
        payload = await resp.json()
        openai_schema("ErrorResponse", payload)
        assert payload["error"]["code"] == "invalid_api_key"
        assert resp.headers["WWW-Authenticate"] == "Bearer"


async def test_any_configured_key_works_and_health_and_metrics_stay_public(make_client: ClientFactory) -> None:
    client = await make_client(api_keys=f"{KEY},{OTHER}")
    for key in (KEY, OTHER):
        assert (await client.post("/v1/chat/completions", json=chat_body(), headers=_auth(key))).status == 200
    assert (await client.get("/health")).status == 200
    assert (await client.get("/metrics")).status == 200
    assert (await client.get("/openapi.json")).status == 200
    preflight = await client.options(
        "/v1/chat/completions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status == 200


async def test_metrics_can_require_a_key(make_client: ClientFactory) -> None:
    client = await make_client(api_keys=KEY, metrics_require_key=True)
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers=_auth(KEY))).status == 200
    assert (await client.get("/health")).status == 200


async def test_keys_file(make_client: ClientFactory, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# team A\n{KEY}\n\n  {OTHER}  \n")
    client = await make_client(api_keys_file=keys)
    assert (await client.get("/v1/models", headers=_auth(OTHER))).status == 200
    assert (await client.get("/v1/models", headers=_auth("# team A"))).status == 401


async def test_keys_never_reach_the_log(make_client: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_client(api_keys=KEY)
    await client.post("/v1/chat/completions", json=chat_body(), headers=_auth(KEY))
    await client.post("/v1/chat/completions", json=chat_body(), headers=_auth("sk-wrong-guess"))
    assert KEY not in caplog.text
    assert "sk-wrong-guess" not in caplog.text
    assert KEY not in repr(make_settings(api_keys=KEY))


async def test_the_openai_client_sends_its_key(aiohttp_server: Any) -> None:
    server: TestServer = await aiohttp_server(create_app(make_settings(api_keys=KEY)))
    base = str(server.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0) as good:
        assert [m.id async for m in good.models.list()] == [MODEL_ID]
    async with openai.AsyncOpenAI(base_url=base, api_key="nope", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as error:
            await bad.models.list()
    assert error.value.code == "invalid_api_key"
