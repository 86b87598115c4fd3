"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's Messages API, answered by the serving
layer's chat (``apis/messages.py`` translates); errors on these routes are in Anthropic's envelope."""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel

from genai_server.apis.chat_events import built_events
from genai_server.apis.messages import (
    CHAT_PARAMS,
    CountTokensRequest,
    MessageBuilder,
    MessagesRequest,
    chat_request,
    stream_error,
    whole_message,
)
from genai_server.errors import APIError
from genai_server.http.app_keys import SERVING
from genai_server.http.handling import blamed, json_response, respond, start_clock, translated
from genai_server.http.request_state import BODY, KEY_OWNER, PARSED
from genai_server.http.sse import SseDialect
from genai_server.protocol import TokenizeRequest

T = TypeVar("T")

# Named events, no [DONE]; an error after the start is Anthropic's error event.
MESSAGES_SSE = SseDialect(named=True, done=b"", error_events=stream_error)


async def create_message(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``."""
    stats = start_clock(request)
    req = MessagesRequest.model_validate(request[BODY])
    chat = request[PARSED] = translated(lambda: chat_request(req), CHAT_PARAMS)
    try:
        result = await request.app[SERVING].chat(chat, stats, request.get(KEY_OWNER, ""))
    except APIError as exc:
        raise blamed(exc, CHAT_PARAMS) from None
    builder = MessageBuilder(req.model)
    if isinstance(result, BaseModel | dict):
        return await respond(request, stats, chat, whole_message(builder, result))
    return await respond(request, stats, chat, built_events(builder, result), MESSAGES_SSE)


async def count_tokens(request: web.Request) -> web.Response:
    """``POST /v1/messages/count_tokens``: the prompt's tokens as the model's tokenizer counts them."""
    req = CountTokensRequest.model_validate(request[BODY])
    chat = translated(lambda: chat_request(req), CHAT_PARAMS)
    tokens = TokenizeRequest(
        model=chat.model,
        messages=chat.messages,
        tools=chat.tools,
        chat_template_kwargs=(chat.model_extra or {}).get("chat_template_kwargs"),
    )
    counted = await request.app[SERVING].tokenize(tokens)
    return json_response({"input_tokens": counted.count})
