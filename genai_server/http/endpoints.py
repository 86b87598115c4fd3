"""The endpoint table's shape: each route declared once with its method, path, handler, operation and whether it is
public, and the one way every middleware, the OpenAPI document and the API-key check ask what a request is.

A request's endpoint is looked up from the route aiohttp matched, so a method the route does not have (a 405) or a
path that has no route (a 404) has no endpoint: it is not a generation request, whatever its path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from pydantic import BaseModel

from genai_server.errors import APIError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Endpoint:
    """One route of the API."""

    method: str
    path: str  # an aiohttp path, e.g. "/v1/models/{model_id:.+}"
    handler: Handler
    summary: str
    # gen_ai.operation.name: set, it is a generation route (body read before the slot, a slot, metrics, a span).
    operation: str | None = None
    public: bool = False  # answered without an API key
    request_model: type[BaseModel] | None = None  # the JSON body it takes (OpenAPI)
    response_model: type[BaseModel] | None = None  # the JSON it answers with (OpenAPI)
    unavailable: bool = False  # may answer 503 with a status object (a readiness probe)
    documented: bool = True  # part of the JSON API that /openapi.json describes (not /metrics, nor itself)
    tokenizes: bool = False  # only tokenizes (no generation): held by the tokenizer's small limit, not a slot
    admin: bool = False  # changes what the server holds: an admin key's, when ADMIN_API_KEYS are set
    # The body of an error on this route: None for OpenAI's envelope; Anthropic's routes give theirs.
    error_body: Callable[[APIError], dict[str, Any]] | None = None

    @property
    def generates(self) -> bool:
        """Whether it is a generation route."""
        return self.operation is not None


ROUTE_ENDPOINTS = web.AppKey("route_endpoints", dict[web.AbstractRoute, Endpoint])


def add_endpoints(app: web.Application, endpoints: Iterable[Endpoint]) -> None:
    """Register every endpoint's route, remembering which endpoint each route serves. A GET is answered for HEAD
    too, as aiohttp's ``add_get`` and every HTTP server do."""
    table = app[ROUTE_ENDPOINTS] = {}
    for endpoint in endpoints:
        resource = app.router.add_resource(endpoint.path)
        table[resource.add_route(endpoint.method, endpoint.handler, expect_handler=_no_early_continue)] = endpoint
        if endpoint.method == hdrs.METH_GET:
            table[resource.add_route(hdrs.METH_HEAD, endpoint.handler, expect_handler=_no_early_continue)] = endpoint


async def _no_early_continue(request: web.Request) -> None:
    """``Expect: 100-continue`` is not answered before the request's checks: aiohttp's default handler sent 100
    Continue at once, inviting a 100 MB body from a client without a key. The request-body middleware sends it,
    after the host, the key and the declared size have passed (``request_body.py``)."""


def endpoint_of(request: web.Request) -> Endpoint | None:
    """The endpoint a request reached; None for an unknown path or a method its route does not have."""
    return request.app.get(ROUTE_ENDPOINTS, {}).get(request.match_info.route)


def public(request: web.Request) -> bool:
    """Whether the request needs no API key: its endpoint is public, or its path is a public endpoint's with a
    method that endpoint lacks (the client learns it is a 405, as it would without keys)."""
    endpoint = endpoint_of(request)
    if endpoint is not None:
        return endpoint.public
    exception = request.match_info.http_exception
    if exception is None or exception.status != web.HTTPMethodNotAllowed.status_code:
        return False
    return any(e.public and e.path == request.path for e in request.app.get(ROUTE_ENDPOINTS, {}).values())


def generates(request: web.Request) -> bool:
    """Whether the request is a generation request: a generation route, with its method."""
    endpoint = endpoint_of(request)
    return endpoint is not None and endpoint.generates


def takes_json(request: web.Request) -> bool:
    """Whether the request's route takes a JSON body (read and checked before anything else, ``request_body.py``): a
    generation route, or another that declares its body (``/tokenize``)."""
    endpoint = endpoint_of(request)
    if endpoint is None:
        return False
    return endpoint.generates or (endpoint.request_model is not None and endpoint.method == hdrs.METH_POST)


def tokenizes(request: web.Request) -> bool:
    """Whether the request only tokenizes (``/tokenize``, ``/detokenize``, ``count_tokens``)."""
    endpoint = endpoint_of(request)
    return endpoint is not None and endpoint.tokenizes
