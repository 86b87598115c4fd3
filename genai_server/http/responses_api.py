"""``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``: OpenAI's Responses API, answered by the
serving layer's chat (``apis/responses.py`` translates), with the responses kept in ``apis/response_store.py``."""

from __future__ import annotations

from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from genai_server.apis.response_store import ResponseStore
from genai_server.apis.responses import (
    CHAT_PARAMS,
    ResponseBuilder,
    ResponsesRequest,
    chat_request,
    input_messages,
    new_response_id,
    response_events,
    skeleton,
    whole_response,
)
from genai_server.errors import APIError, InvalidRequest, NotFound
from genai_server.http.app_keys import RESPONSE_STORE, SERVING
from genai_server.http.handling import blamed, json_response, respond, start_clock, translated
from genai_server.http.request_state import BODY, KEY_OWNER, PARSED
from genai_server.http.sse import SseDialect

T = TypeVar("T")


async def create_response(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``."""
    stats = start_clock(request)
    req = ResponsesRequest.model_validate(request[BODY])
    owner = request.get(KEY_OWNER, "")
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


async def get_response(request: web.Request) -> web.Response:
    """``GET /v1/responses/{response_id}``: a kept response, to the key that created it."""
    stored = request.app[RESPONSE_STORE].get(request.match_info["response_id"], request.get(KEY_OWNER, ""))
    if stored is None:
        raise _not_found(request)
    return json_response(stored.response)


async def delete_response(request: web.Request) -> web.Response:
    """``DELETE /v1/responses/{response_id}``."""
    response_id = request.match_info["response_id"]
    if not request.app[RESPONSE_STORE].delete(response_id, request.get(KEY_OWNER, "")):
        raise _not_found(request)
    return json_response({"id": response_id, "object": "response", "deleted": True})


def _history(store: ResponseStore, req: ResponsesRequest, owner: str) -> list[dict[str, Any]]:
    """The conversation ``previous_response_id`` continues (none without one)."""
    if req.previous_response_id is None:
        return []
    previous = store.get(req.previous_response_id, owner)
    if previous is None:
        raise InvalidRequest(
            f"Previous response with id '{req.previous_response_id[:256]}' not found (responses are kept in memory, "
            "within the store's bounds, for the API key that created them)",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return previous.conversation


def _not_found(request: web.Request) -> NotFound:
    shown = request.match_info["response_id"][:256]
    return NotFound(f"No response found with id '{shown}'", param="response_id", code="response_not_found")
