"""Per-request telemetry returned to clients, and the Prometheus /metrics it feeds."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import openai
from aiohttp.test_utils import TestServer

from genai_server.app import create_app
from tests.harness.bodies import MODEL_ID, chat_body, long_stream
from tests.harness.in_process import make_settings
from tests.harness.responses import metric_sample, stream_chunks
from tests.harness.waiting import eventually_async

METRIC_KEYS = {
    "queue_time_ms",
    "time_to_first_token_ms",
    "time_per_output_token_ms",
    "mean_itl_ms",
    "itl_p50_ms",
    "itl_p95_ms",
    "generation_time_ms",
    "e2e_latency_ms",
    "tokens_per_second",
    "prompt_tokens",
    "cached_prompt_tokens",
    "completion_tokens",
    "peak_rss_mb",
    "gpu_memory_used_start_mb",
    "gpu_memory_peak_mb",
    "gpu_memory_delta_mb",
    "gpu_process_memory_mb",
    "backend_reported",
}


def _check_metrics(metrics: dict[str, Any], usage: dict[str, int]) -> None:
    assert set(metrics) == METRIC_KEYS
    assert metrics["prompt_tokens"] == usage["prompt_tokens"]
    assert metrics["completion_tokens"] == usage["completion_tokens"]
    assert 0 <= metrics["queue_time_ms"] <= metrics["time_to_first_token_ms"] <= metrics["e2e_latency_ms"]
    assert metrics["generation_time_ms"] <= metrics["e2e_latency_ms"]
    assert metrics["tokens_per_second"] > 0
    assert metrics["itl_p50_ms"] <= metrics["itl_p95_ms"]
    n = metrics["completion_tokens"]
    expected_tpot = (metrics["e2e_latency_ms"] - metrics["time_to_first_token_ms"]) / (n - 1)
    assert abs(metrics["time_per_output_token_ms"] - expected_tpot) < 0.01
    assert metrics["peak_rss_mb"] > 10
    # No GPU and no NVML driver here: those fields are null, not guesses.
    assert metrics["gpu_memory_peak_mb"] is None


async def test_non_streaming_response_carries_metrics_performance_and_headers(client: Any) -> None:
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=20))
    body = await resp.json()
    _check_metrics(body["metrics"], body["usage"])
    performance = body["performance"]
    assert performance["latency_ms"] == body["metrics"]["e2e_latency_ms"]
    assert performance["peak_memory_mb"] == body["metrics"]["peak_rss_mb"]
    assert int(resp.headers["x-generated-tokens"]) == body["usage"]["completion_tokens"] == 20
    assert int(resp.headers["x-prompt-tokens"]) == body["usage"]["prompt_tokens"]
    for header in ("x-queue-time", "x-inference-time", "x-time-per-token", "x-total-time", "x-time-to-first-token"):
        assert float(resp.headers[header]) >= 0
    assert float(resp.headers["x-total-time"]) == body["metrics"]["e2e_latency_ms"]


async def test_stream_usage_chunk_carries_metrics_only_when_asked(client: Any, openai_schema: Any) -> None:
    resp = await client.post(
        "/v1/completions",
        json={
            "model": MODEL_ID,
            "prompt": "hi",
            "max_tokens": 12,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    chunks = stream_chunks(await resp.text())
    _check_metrics(chunks[-1]["metrics"], chunks[-1]["usage"])
    assert all("metrics" not in c for c in chunks[:-1])

    plain = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    plain_chunks = stream_chunks(await plain.text())
    assert all("metrics" not in c and "usage" not in c for c in plain_chunks)
    for chunk in plain_chunks:
        openai_schema("CreateChatCompletionStreamResponse", chunk)


async def test_a_setting_forces_the_usage_and_metrics_chunk(make_client: Any) -> None:
    client = await make_client(stream_usage_always=True)
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=5, stream=True))
    chunks = stream_chunks(await resp.text())
    assert chunks[-1]["choices"] == []
    _check_metrics(chunks[-1]["metrics"], chunks[-1]["usage"])


async def test_reported_ttft_and_e2e_agree_with_the_client_clock(aiohttp_server: Any) -> None:
    server: TestServer = await aiohttp_server(create_app(make_settings()))
    async with openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0) as oai:
        start = time.perf_counter()
        stream = await oai.completions.create(
            model=MODEL_ID,
            prompt="Once upon a time",
            max_tokens=200,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        first_text = None
        last = None
        async for chunk in stream:
            if first_text is None and chunk.choices and chunk.choices[0].text:
                first_text = time.perf_counter() - start
            last = chunk
        client_e2e = time.perf_counter() - start
    assert first_text is not None and last is not None and last.model_extra is not None
    metrics = last.model_extra["metrics"]
    # Generous tolerance: the server's clock starts when the request reaches its handler, a little after
    # the client sent it, and stops before the last bytes travel back.
    assert metrics["time_to_first_token_ms"] <= first_text * 1000 + 5
    assert metrics["time_to_first_token_ms"] >= first_text * 1000 - 250
    assert metrics["e2e_latency_ms"] <= client_e2e * 1000 + 5
    assert metrics["e2e_latency_ms"] >= client_e2e * 1000 - 250


async def test_openai_client_keeps_the_metrics(aiohttp_server: Any) -> None:
    server: TestServer = await aiohttp_server(create_app(make_settings()))
    async with openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0) as oai:
        result = await oai.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
    assert result.model_extra is not None
    assert result.model_extra["metrics"]["completion_tokens"] == 4


def _gauge(text: str, name: str) -> float:
    """The value of an unlabelled gauge."""
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_prometheus_metrics_count_requests_tokens_and_latencies(make_client: Any) -> None:
    client = await make_client(max_concurrent_requests=1, max_queued_requests=0)
    labels = {"model": MODEL_ID, "backend": "onnx"}
    await client.post("/v1/chat/completions", json=chat_body(max_tokens=7))
    await client.post("/v1/chat/completions", json=chat_body(temperature=9))  # 400
    stream = await client.post("/v1/chat/completions", json=long_stream(1500))
    while b'"role"' in (line := await stream.content.readline()) or b'"content"' not in line:
        pass  # read on until the first generated text: the stream has produced tokens
    limited = await client.post("/v1/chat/completions", json=chat_body())
    assert limited.status == 429
    running = await (await client.get("/metrics")).text()
    assert _gauge(running, "genai_server_num_requests_running") == 1
    stream.close()  # a client that leaves mid-stream

    async def counted() -> str | None:
        """The exposition once it counts the disconnect (no sample at all until the first one)."""
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
        try:
            return text if metric_sample(text, "genai_server_client_disconnects_total", **labels) == 1 else None
        except AssertionError:
            return None

    text = await eventually_async(counted, what="the disconnect counted")
    assert metric_sample(text, "genai_server_requests_total", status="200", **labels) == 1
    assert metric_sample(text, "genai_server_requests_total", status="499", **labels) == 1  # the client left
    # Refused before reaching a backend: no model label from the request.
    assert metric_sample(text, "genai_server_requests_total", status="400", model="-", backend="onnx") == 1
    assert metric_sample(text, "genai_server_requests_total", status="429", model="-", backend="onnx") == 1
    assert metric_sample(text, "genai_server_generation_tokens_total", **labels) >= 8  # 7 + at least 1 streamed
    assert metric_sample(text, "genai_server_time_to_first_token_seconds_count", **labels) == 2
    assert metric_sample(text, "genai_server_e2e_request_latency_seconds_count", **labels) == 2
    assert metric_sample(text, "genai_server_inter_token_latency_seconds_count", **labels) >= 6
    assert _gauge(text, "genai_server_num_requests_running") == 0
    assert "process_resident_memory_bytes" in text


async def _waiting(client: Any, count: int) -> bool:
    return _gauge(await (await client.get("/metrics")).text(), "genai_server_num_requests_waiting") == count


async def test_waiting_counts_requests_queued_for_a_slot(make_client: Any) -> None:
    """vLLM's num_requests_waiting meaning (accepted, not yet running), which an autoscaler reads."""
    client = await make_client(max_concurrent_requests=1, max_queued_requests=4)
    stream = await client.post("/v1/chat/completions", json=long_stream(1500))
    while b'"content"' not in await stream.content.readline():
        pass  # generating: the one slot is taken
    queued = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body(max_tokens=2)))
    await eventually_async(lambda: _waiting(client, 1), what="the queued request showing as waiting")
    stream.close()
    assert (await queued).status == 200
    assert _gauge(await (await client.get("/metrics")).text(), "genai_server_num_requests_waiting") == 0


async def test_a_router_may_ask_for_the_load_on_each_response(make_client: Any) -> None:
    """ORCA's endpoint-load-metrics (vLLM's): the gauges at the time the headers left, only when asked."""
    client = await make_client(max_concurrent_requests=1, max_queued_requests=4)
    plain = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
    assert "endpoint-load-metrics" not in plain.headers
    stream = await client.post(
        "/v1/chat/completions", json=long_stream(1500), headers={"endpoint-load-metrics-format": "TEXT"}
    )
    text = stream.headers["endpoint-load-metrics"]
    assert text.startswith("TEXT ") and "named_metrics.num_requests_running=1" in text
    assert "named_metrics.kv_cache_usage_perc=" in text and "named_metrics.num_requests_waiting=0" in text
    while b'"content"' not in await stream.content.readline():
        pass
    queued = asyncio.ensure_future(
        client.post(
            "/v1/chat/completions", json=chat_body(max_tokens=2), headers={"endpoint-load-metrics-format": "json"}
        )
    )
    await eventually_async(lambda: _waiting(client, 1), what="the request waiting for the slot")
    stream.close()
    answer = await queued
    kind, payload = answer.headers["endpoint-load-metrics"].split(" ", 1)
    assert kind == "JSON"
    named = json.loads(payload)["named_metrics"]
    # A JSON answer's headers leave after its slot was given back, and the stream before it had left.
    assert (named["num_requests_running"], named["num_requests_waiting"]) == (0, 0)
    assert 0 <= named["kv_cache_usage_perc"] <= 1
