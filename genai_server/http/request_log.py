"""Request ids and the access log: one structured line per request.

Outermost middleware, so it sees the final status after error mapping, and its
``X-Request-Id`` header is added when any response is prepared, streams included.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from genai_server.http.app_keys import ARRIVAL, FINAL_STATUS, REQUEST_ID, REQUEST_STATS
from genai_server.logs import current_request_id

log = logging.getLogger("genai_server.access")
# What happened to a request besides its access line (a client that left).
events_log = logging.getLogger(__name__)
# Prompts and completions go to their own logger, silent unless LOG_PROMPTS is on.
prompts_log = logging.getLogger("genai_server.prompts")

# nginx's code for a request whose client went away before the answer was complete.
CLIENT_CLOSED_REQUEST = 499

# A client's id is echoed back only if it is short and harmless in a header and a log line.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _SAFE_ID.match(given) else uuid.uuid4().hex


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID]


def setup_request_log(app: web.Application) -> None:
    """Add the request-id/access-log middleware and the signal that sets the response header."""

    @web.middleware
    async def request_log(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request[REQUEST_ID] = _request_id(request)
        request_id_token = current_request_id.set(request[REQUEST_ID])
        started = request[ARRIVAL] = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            # aiohttp cancels the handler of a client that disconnected (handler_cancellation).
            status = CLIENT_CLOSED_REQUEST
            transport = request.transport
            gone = transport is None or transport.is_closing()
            events_log.info("client disconnected" if gone else "handler cancelled", extra={"fields": {"status": 499}})
            raise
        finally:
            status = final_status(request, status)
            request[FINAL_STATUS] = status
            _log_line(request, status, (time.perf_counter() - started) * 1000)
            current_request_id.reset(request_id_token)

    app.middlewares.append(request_log)
    app.on_response_prepare.append(_add_request_id)


def final_status(request: web.Request, status: int) -> int:
    """The status a request really ended with: 499 if the client went away mid-stream (its 200 headers were sent,
    the answer was not), the error's status if an error ended its stream, else the response's."""
    stats = request.get(REQUEST_STATS)
    if stats is None:
        return status
    if stats.client_disconnected:
        return CLIENT_CLOSED_REQUEST
    return stats.error_status or status


def _log_line(request: web.Request, status: int, duration_ms: float) -> None:
    fields: dict[str, object] = {
        "request_id": request[REQUEST_ID],
        "method": request.method,
        "path": request.path,
        "status": status,
        "duration_ms": round(duration_ms, 2),
    }
    stats = request.get(REQUEST_STATS)
    if stats is not None:
        inference = stats.inference_time_ms
        fields.update(
            model=stats.model,
            prompt_tokens=stats.prompt_tokens,
            cached_prompt_tokens=stats.cached_prompt_tokens,
            completion_tokens=stats.completion_tokens,
            inference_time_ms=None if inference is None else round(inference, 2),
        )
    log.info("%s %s %s", request.method, request.path, status, extra={"fields": fields})


def log_exchange(request: web.Request, body: BaseModel, result: BaseModel | dict[str, Any] | None) -> None:
    """With LOG_PROMPTS on (and only then): the prompt and, when not streamed, the completion."""
    answer = result.model_dump() if isinstance(result, BaseModel) else result
    prompt = body.model_dump(include={"messages", "prompt"})
    completion = [
        choice.get("message", choice).get("content", choice.get("text")) for choice in (answer or {}).get("choices", [])
    ] or None
    prompts_log.info(
        "prompt and completion",
        extra={"fields": {"request_id": request.get(REQUEST_ID), **prompt, "completion": completion}},
    )
