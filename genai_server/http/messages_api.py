"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's Messages API, answered by the serving
layer's chat (``apis/messages.py`` translates), or relayed as it came to an engine that serves it itself
(``native_apis``); errors on these routes are in Anthropic's envelope."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel

from genai_server.apis.chat_events import built_events
from genai_server.apis.messages import (
    CHAT_PARAMS,
    CountTokensRequest,
    MessageBuilder,
    MessagesRequest,
    chat_request,
    last_event,
    stream_error,
    whole_message,
    with_figures,
)
from genai_server.errors import APIError
from genai_server.http.app_keys import SERVING
from genai_server.http.handling import blamed, json_response, respond, start_clock, translated
from genai_server.http.request_state import BODY, KEY_OWNER, PARSED
from genai_server.http.sse import SseDialect
from genai_server.protocol import TokenizeRequest
from genai_server.serving import AnswerShape

# Named events, no [DONE]; an error after the start is Anthropic's error event.
MESSAGES_SSE = SseDialect(named=True, done=b"", error_events=stream_error)
# An engine's own Messages stream: message_delta carries the usage and our figures.
RELAYED = AnswerShape(final=last_event, attach=with_figures)


async def create_message(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``."""
    stats = start_clock(request)
    req = MessagesRequest.model_validate(request[BODY])
    if request.app[SERVING].natively(req.model, "messages"):
        result = await request.app[SERVING].relay_native("messages", req.model, request[BODY], stats, RELAYED)
        return await respond(request, stats, None, result, MESSAGES_SSE)
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
    if request.app[SERVING].natively(req.model, "messages"):
        path = "/messages/count_tokens"
        return json_response(await request.app[SERVING].native_request(req.model, "POST", path, request[BODY]))
    chat = translated(lambda: chat_request(req), CHAT_PARAMS)
    tokens = TokenizeRequest(
        model=chat.model,
        messages=chat.messages,
        tools=chat.tools,
        chat_template_kwargs=(chat.model_extra or {}).get("chat_template_kwargs"),
    )
    counted = await request.app[SERVING].tokenize(tokens)
    return json_response({"input_tokens": counted.count})
