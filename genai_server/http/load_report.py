"""The per-request load report a router can pace by without scraping: ORCA's ``endpoint-load-metrics`` response
header, as vLLM adopted it. A client (Envoy, an endpoint picker) that sends ``endpoint-load-metrics-format: text``
or ``json`` with a generation request gets, on the response's headers, the same gauges ``/metrics`` has at that
moment: ``TEXT named_metrics.kv_cache_usage_perc=0.25, named_metrics.num_requests_waiting=2,
named_metrics.num_requests_running=3`` or ``JSON {"named_metrics": {...}}``. Without the request header nothing is
added, so the default costs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web

from genai_server.http.endpoints import generates
from genai_server.telemetry.prometheus import Gauges

REQUEST_HEADER = "endpoint-load-metrics-format"
RESPONSE_HEADER = "endpoint-load-metrics"


def setup_load_report(app: web.Application, gauges: Callable[[], Gauges]) -> None:
    """Answer a load-report request header on generation responses (streams: when their headers leave)."""

    async def report(request: web.Request, response: web.StreamResponse) -> None:
        wanted = request.headers.get(REQUEST_HEADER, "").strip().lower()
        if wanted in ("text", "json") and generates(request):
            response.headers[RESPONSE_HEADER] = load_metrics(gauges(), wanted)

    app.on_response_prepare.append(report)


def load_metrics(gauges: Gauges, fmt: str) -> str:
    """The header's value in ``fmt`` (``text`` or ``json``)."""
    named = {
        # The fullest embedded engine: the one a router should spare.
        "kv_cache_usage_perc": round(max(gauges.kv_cache_usage.values(), default=0.0), 4),
        "num_requests_waiting": gauges.waiting,
        "num_requests_running": gauges.running,
    }
    if fmt == "json":
        return "JSON " + json.dumps({"named_metrics": named}, separators=(",", ":"))
    return "TEXT " + ", ".join(f"named_metrics.{name}={value}" for name, value in named.items())
