"""Typed per-request state: what the middlewares and the handler leave on a request for its record, declared in one
place. The request-record middleware (outermost) reads it once, when the request has ended."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from genai_server.errors import APIError
from genai_server.protocol import SamplingRequest
from genai_server.telemetry.clock import RequestTelemetry
from genai_server.telemetry.ttft_forecast import Ticket


@dataclass(frozen=True)
class StreamOutcome:
    """How a stream ended after its 200 headers left (sse.py)."""

    client_left: bool = False  # the client disconnected or stopped reading
    error: APIError | None = None  # the error an error event reported


# Set by the request-record middleware when the request arrives.
REQUEST_ID = web.RequestKey("request_id", str)
# perf_counter() when the request reached the server, before any queueing: where its telemetry starts.
ARRIVAL = web.RequestKey("arrival", float)
# A fingerprint of the API key a request presented (set by auth.py when keys are on): its KV caches' owner.
KEY_OWNER = web.RequestKey("key_owner", str)
# A generation request's JSON body, read and checked before it takes a slot (request_body.py).
BODY = web.RequestKey("body", dict[str, Any])
# The body as the handler parsed it: what the record reads the request's attributes from.
PARSED = web.RequestKey("parsed", SamplingRequest)
# The generation's clock, started by the handler at the request's arrival and stopped by the serving layer.
REQUEST_STATS = web.RequestKey("request_stats", RequestTelemetry)
# A generation request's place in its model's TTFT forecast (slo_admission.py), told of its first token by its clock.
SLO_TICKET = web.RequestKey("slo_ticket", Ticket)
# The error the client was shown as a response (error_mapping.py).
ERROR = web.RequestKey("error", APIError)
# How a stream ended after its 200 headers left: a client that left, or an error event (sse.py).
STREAM_OUTCOME = web.RequestKey("stream_outcome", StreamOutcome)
