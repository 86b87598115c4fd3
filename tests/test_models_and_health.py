"""GET /health, /v1/models and /v1/models/{id}."""

from __future__ import annotations

import time
from typing import Any

from tests.harness.bodies import MODEL_ID


async def test_health_names_the_loaded_model(client: Any) -> None:
    resp = await client.get("/health")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok", "model": MODEL_ID}


async def test_models_lists_the_model_with_server_start_time(client: Any, openai_schema: Any) -> None:
    resp = await client.get("/v1/models")
    assert resp.status == 200
    body = await resp.json()
    openai_schema("ListModelsResponse", body)
    assert [m["id"] for m in body["data"]] == [MODEL_ID]
    assert abs(body["data"][0]["created"] - time.time()) < 300


async def test_model_by_id(client: Any, openai_schema: Any) -> None:
    resp = await client.get(f"/v1/models/{MODEL_ID}")
    assert resp.status == 200
    body = await resp.json()
    openai_schema("Model", body)
    assert body["id"] == MODEL_ID


async def test_unknown_model_id_is_404_model_not_found(client: Any, openai_schema: Any) -> None:
    resp = await client.get("/v1/models/no-such-model")
    assert resp.status == 404
    body = await resp.json()
    openai_schema("ErrorResponse", body)
    assert body["error"]["code"] == "model_not_found"


async def test_model_id_setting_renames_the_model(make_client: Any) -> None:
    client = await make_client(model_id="my-model")
    body = await (await client.get("/v1/models")).json()
    assert body["data"][0]["id"] == "my-model"


async def test_max_model_len_caps_the_context(make_client: Any) -> None:
    client = await make_client(max_model_len=64)
    card = await (await client.get(f"/v1/models/{MODEL_ID}")).json()
    assert card["max_model_len"] == card["context_length"] == 64
    body = {"model": MODEL_ID, "prompt": "hello", "temperature": 0}
    resp = await client.post("/v1/completions", json={**body, "max_tokens": 64})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "context_length_exceeded"
    resp = await client.post("/v1/completions", json=body)  # no max_tokens: the rest of the 64
    usage = (await resp.json())["usage"]
    assert usage["total_tokens"] <= 64


async def test_models_report_the_model_context(client: Any) -> None:
    card = await (await client.get(f"/v1/models/{MODEL_ID}")).json()
    assert card["max_model_len"] == 2048
