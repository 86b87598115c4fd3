"""CORS on every route, preflight and error responses included."""

from __future__ import annotations

from typing import Any

from tests.harness.bodies import chat_body, long_stream

ORIGIN = "https://app.example"


async def test_preflight_is_answered(client: Any) -> None:
    resp = await client.options(
        "/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
    )
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] in (ORIGIN, "*")
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert "CONTENT-TYPE" in resp.headers["Access-Control-Allow-Headers"].upper()


async def test_responses_carry_cors_headers(client: Any) -> None:
    for method, path, body in [
        ("GET", "/v1/models", None),
        ("GET", "/health", None),
        ("POST", "/v1/chat/completions", chat_body(max_tokens=2)),
    ]:
        resp = await client.request(method, path, json=body, headers={"Origin": ORIGIN})
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] in (ORIGIN, "*")
        assert "X-REQUEST-ID" in resp.headers["Access-Control-Expose-Headers"].upper()


async def test_error_responses_carry_cors_headers(make_client: Any) -> None:
    client = await make_client(max_concurrent_requests=1, max_queued_requests=0)
    bad = await client.post("/v1/chat/completions", json={"model": "x"}, headers={"Origin": ORIGIN})
    assert bad.status == 400
    assert bad.headers["Access-Control-Allow-Origin"] in (ORIGIN, "*")
    missing = await client.get("/v1/models/nope", headers={"Origin": ORIGIN})
    assert missing.status == 404
    assert missing.headers["Access-Control-Allow-Origin"] in (ORIGIN, "*")

    stream = await client.post("/v1/chat/completions", json=long_stream(1500))
    await stream.content.readline()
    limited = await client.post("/v1/chat/completions", json=chat_body(), headers={"Origin": ORIGIN})
    assert limited.status == 429
    assert limited.headers["Access-Control-Allow-Origin"] in (ORIGIN, "*")
    assert "RETRY-AFTER" in limited.headers["Access-Control-Expose-Headers"].upper()
    await stream.read()


async def test_only_listed_origins_are_allowed(make_client: Any) -> None:
    client = await make_client(cors_origins="https://good.example, https://also.example")
    good = await client.get("/v1/models", headers={"Origin": "https://also.example"})
    assert good.headers["Access-Control-Allow-Origin"] == "https://also.example"
    evil = await client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert evil.status == 200
    assert "Access-Control-Allow-Origin" not in evil.headers
    preflight = await client.options(
        "/v1/models", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert preflight.status == 403


async def test_unknown_routes_and_methods_carry_cors_headers(make_client: Any) -> None:
    client = await make_client(cors_origins="https://good.example")
    for method, path, status in [("GET", "/v1/nothing", 404), ("DELETE", "/v1/models", 405)]:
        resp = await client.request(method, path, headers={"Origin": "https://good.example"})
        assert resp.status == status
        assert resp.headers["Access-Control-Allow-Origin"] == "https://good.example"
        other = await client.request(method, path, headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers
