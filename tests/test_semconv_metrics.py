"""The OpenTelemetry GenAI server histograms in /metrics, with the spec's names, buckets and attributes, and
goodput against the configured SLOs."""

from __future__ import annotations

import re
from typing import Any

from tests.harness.bodies import MODEL_ID, chat_body
from tests.harness.in_process import ClientFactory
from tests.harness.responses import metric_sample

# gen-ai-metrics.md, "Metric: gen_ai.server.*": the explicit bucket boundaries the spec advises.
SPEC_BUCKETS = {
    "gen_ai_server_time_to_first_token_seconds": ".001 .005 .01 .02 .04 .06 .08 .1 .25 .5 .75 1 2.5 5 7.5 10",
    "gen_ai_server_time_per_output_token_seconds": ".01 .025 .05 .075 .1 .15 .2 .3 .4 .5 .75 1 2.5",
    "gen_ai_server_request_duration_seconds": ".01 .02 .04 .08 .16 .32 .64 1.28 2.56 5.12 10.24 20.48 40.96 81.92",
}
CHAT = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "onnxruntime_genai", "gen_ai_request_model": MODEL_ID}


async def _metrics(client: Any) -> str:
    resp = await client.get("/metrics")
    return str(await resp.text())


def _bounds(text: str, name: str) -> list[float]:
    bounds = {float(le) for le in re.findall(rf'^{name}_bucket{{[^}}]*le="([^"+]+)"', text, flags=re.M)}
    return sorted(bounds)


async def test_the_semconv_histograms_have_the_specs_names_buckets_and_attributes(make_client: ClientFactory) -> None:
    client = await make_client()
    assert (await client.post("/v1/chat/completions", json=chat_body(max_tokens=4))).status == 200
    too_long = await client.post("/v1/chat/completions", json=chat_body(max_tokens=10**6))
    assert too_long.status == 400
    completion = {"model": MODEL_ID, "prompt": "Once", "max_tokens": 3}
    assert (await client.post("/v1/completions", json=completion)).status == 200
    text = await _metrics(client)
    for name, buckets in SPEC_BUCKETS.items():
        assert _bounds(text, name) == [float(bound) for bound in buckets.split()], name
        assert metric_sample(text, f"{name}_count", **CHAT, error_type="") == 1
    # A request that failed has its duration recorded under error.type, and no first token.
    refused = {**CHAT, "gen_ai_request_model": "-"}  # refused before a backend: the id sent is not a label
    assert metric_sample(text, "gen_ai_server_request_duration_seconds_count", **refused, error_type="400") == 1
    assert 'gen_ai_server_time_to_first_token_seconds_count{error_type="400"' not in text
    operation = {**CHAT, "gen_ai_operation_name": "text_completion"}
    assert metric_sample(text, "gen_ai_server_request_duration_seconds_count", **operation, error_type="") == 1
    # Ours stay beside them, with their finer buckets.
    assert "genai_server_time_to_first_token_seconds_bucket" in text


async def test_goodput_counts_the_requests_that_met_every_objective(make_client: ClientFactory) -> None:
    labels = {"model": MODEL_ID, "backend": "onnx"}
    generous = await make_client(slo_ttft_ms=60_000, slo_tpot_ms=60_000, slo_e2e_ms=60_000)
    strict = await make_client(slo_ttft_ms=60_000, slo_e2e_ms=0.001)  # no answer ends within a microsecond
    unset = await make_client()
    for client in (generous, strict, unset):
        for _ in range(2):
            assert (await client.post("/v1/chat/completions", json=chat_body(max_tokens=4))).status == 200
    assert metric_sample(await _metrics(generous), "genai_server_goodput_requests_total", **labels) == 2
    assert metric_sample(await _metrics(strict), "genai_server_goodput_requests_total", **labels) == 0
    assert "goodput" not in await _metrics(unset), "no objective, no goodput series"
