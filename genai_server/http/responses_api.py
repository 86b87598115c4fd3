"""``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``: OpenAI's Responses API, answered by the
serving layer's chat (``apis/responses.py`` translates), with the responses kept in ``apis/response_store.py``; or,
for a model whose engine serves the API itself (``native_apis``), relayed to it as it came."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any
from urllib.parse import quote

from aiohttp import web
from pydantic import BaseModel

from genai_server.apis.response_store import ResponseStore
from genai_server.apis.responses import (
    CHAT_PARAMS,
    ResponseBuilder,
    ResponsesRequest,
    chat_request,
    input_messages,
    last_event,
    new_response_id,
    relayed_failure,
    response_events,
    skeleton,
    whole_response,
    with_figures,
)
from genai_server.errors import APIError, InvalidRequest, NotFound
from genai_server.http.app_keys import RESPONSE_STORE, SERVING
from genai_server.http.handling import blamed, json_response, respond, start_clock, translated
from genai_server.http.request_state import BODY, KEY_OWNER, PARSED
from genai_server.http.sse import SseDialect
from genai_server.serving import AnswerShape
from genai_server.telemetry.clock import RequestTelemetry

# An engine's own Responses stream: its last event carries the usage and our figures; an error after the start is
# the ``error`` event.
RELAYED = AnswerShape(final=last_event, attach=with_figures)
_RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
RELAYED_SSE = SseDialect(named=True, done=b"", error_events=relayed_failure)


async def create_response(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``."""
    stats = start_clock(request)
    req = ResponsesRequest.model_validate(request[BODY])
    owner = request.get(KEY_OWNER, "")
    if request.app[SERVING].natively(req.model, "responses"):
        return await _relay(request, stats, req, owner)
    store = request.app[RESPONSE_STORE]
    conversation = _history(store, req, owner) + translated(lambda: input_messages(req.input), CHAT_PARAMS)
    chat = translated(lambda: chat_request(req, conversation), CHAT_PARAMS)
    request[PARSED] = chat
    builder = ResponseBuilder(skeleton(req, new_response_id()))

    def keep(done: ResponseBuilder) -> None:
        if req.stored:
            store.put(owner, done.response, [*conversation, done.assistant_message()])

    try:
        result = await request.app[SERVING].chat(chat, stats, owner)
    except APIError as exc:
        raise blamed(exc, CHAT_PARAMS) from None
    if isinstance(result, BaseModel | dict):
        answer = whole_response(builder, result)
        keep(builder)
        return await respond(request, stats, chat, answer)
    events = response_events(builder, result, keep)
    return await respond(request, stats, chat, events, SseDialect(named=True, done=b"", error_events=builder.fail))


async def _relay(
    request: web.Request, stats: RequestTelemetry, req: ResponsesRequest, owner: str
) -> web.StreamResponse:
    """The request as it came to an engine that serves the Responses API itself; the engine keeps the response,
    this store only whose it is (so that another key can neither read it nor continue it)."""
    store = request.app[RESPONSE_STORE]
    previous = req.previous_response_id
    if previous is not None:
        kept = store.get(previous, owner)
        if kept is None or kept.relayed_to != req.model:
            raise _previous_not_found(previous)

    def keep(response_id: object) -> None:
        # Only an id that is safe in a path (it goes back to the engine in GET and DELETE) is remembered.
        if req.stored and isinstance(response_id, str) and _RESPONSE_ID.fullmatch(response_id):
            store.remember(owner, response_id, req.model)

    result = await request.app[SERVING].relay_native("responses", req.model, request[BODY], stats, RELAYED)
    if isinstance(result, BaseModel | dict):
        keep(result.get("id") if isinstance(result, dict) else None)
        return await respond(request, stats, None, result)
    return await respond(request, stats, None, _remembering(result, keep), RELAYED_SSE)


async def _remembering(
    events: AsyncGenerator[BaseModel | dict[str, Any], None], keep: Callable[[object], None]
) -> AsyncGenerator[BaseModel | dict[str, Any], None]:
    """An engine's events, its response's id noted from ``response.created``."""
    async with aclosing(events):
        async for event in events:
            if isinstance(event, dict) and event.get("type") == "response.created":
                keep((event.get("response") or {}).get("id"))
            yield event


async def get_response(request: web.Request) -> web.Response:
    """``GET /v1/responses/{response_id}``: a kept response, to the key that created it (from the engine that
    keeps it, for one relayed as it is)."""
    response_id = request.match_info["response_id"]
    stored = request.app[RESPONSE_STORE].get(response_id, request.get(KEY_OWNER, ""))
    if stored is None:
        raise _not_found(request)
    if stored.relayed_to is not None:
        return json_response(await request.app[SERVING].native_request(stored.relayed_to, "GET", _path(response_id)))
    return json_response(stored.response)


async def delete_response(request: web.Request) -> web.Response:
    """``DELETE /v1/responses/{response_id}``."""
    response_id = request.match_info["response_id"]
    owner = request.get(KEY_OWNER, "")
    stored = request.app[RESPONSE_STORE].get(response_id, owner)
    if stored is None:
        raise _not_found(request)
    if stored.relayed_to is not None:
        await request.app[SERVING].native_request(stored.relayed_to, "DELETE", _path(response_id))
    request.app[RESPONSE_STORE].delete(response_id, owner)
    return json_response({"id": response_id, "object": "response", "deleted": True})


def _path(response_id: str) -> str:
    return f"/responses/{quote(response_id, safe='')}"


def _history(store: ResponseStore, req: ResponsesRequest, owner: str) -> list[dict[str, Any]]:
    """The conversation ``previous_response_id`` continues (none without one)."""
    if req.previous_response_id is None:
        return []
    previous = store.get(req.previous_response_id, owner)
    if previous is None or previous.relayed_to is not None:
        raise _previous_not_found(req.previous_response_id)
    return previous.conversation


def _previous_not_found(response_id: str) -> InvalidRequest:
    return InvalidRequest(
        f"Previous response with id '{response_id[:256]}' not found (responses are kept in memory, within the "
        "store's bounds, for the API key that created them)",
        param="previous_response_id",
        code="previous_response_not_found",
    )


def _not_found(request: web.Request) -> NotFound:
    shown = request.match_info["response_id"][:256]
    return NotFound(f"No response found with id '{shown}'", param="response_id", code="response_not_found")
