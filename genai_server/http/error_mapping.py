"""Error mapping: every error a client sees is the OpenAI envelope (Anthropic's on the routes that speak its API),
mapped here and nowhere else."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError

from genai_server.errors import (
    APIError,
    Forbidden,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServerError,
    UnsupportedMediaType,
    from_validation_error,
)
from genai_server.http.endpoints import endpoint_of
from genai_server.http.request_state import ERROR

log = logging.getLogger(__name__)

# An unknown route's method and path are named in its 404 up to this many characters each.
_PATH_CHARS = 200

_HTTP_ERRORS: dict[int, type[APIError]] = {
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
}


def error_response(error: APIError, request: web.Request) -> web.Response:
    """The JSON response for ``error``, in the envelope of the API the request's route speaks."""
    endpoint = endpoint_of(request)
    shape = endpoint.error_body if endpoint is not None else None
    body = shape(error) if shape is not None else error.envelope()
    return web.json_response(body, status=error.status, headers=error.headers)


def to_api_error(exc: BaseException) -> APIError:
    """Any exception as the ``APIError`` a client is shown; unexpected ones become a bare 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, web.HTTPException):
        error_class = _HTTP_ERRORS.get(exc.status, InvalidRequest if exc.status < 500 else ServerError)
        # A 405 says which methods the route has (RFC 9110 requires Allow).
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_class(exc.text or exc.reason, headers=allow)
    return ServerError("The server had an error while processing your request")


def _routing_error(request: web.Request, exc: web.HTTPException) -> APIError:
    """aiohttp's own refusal of a request no route matched, named as OpenAI names it, so that a client (LangChain,
    say) reports a missing route rather than a missing model."""
    if exc.status == 404 and request.match_info.http_exception is not None:
        return NotFound(f"Invalid URL ({_shown(request.method)} {_shown(request.path)})")
    return to_api_error(exc)


def _shown(text: str) -> str:
    """A client's method or path as an error message may repeat it: cut short, and nothing but printable characters
    (a decoded path can hold line breaks, NUL or terminal escapes)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else "?" for c in text[:_PATH_CHARS])


def log_server_error(exc: BaseException, error: APIError, during: str) -> None:
    """A 5xx in one place and one line: an expected fault (an upstream's, the drain, the engine's report) with its
    cause and no traceback; anything else is a fault of ours, logged with its traceback. 4xx are the client's and
    only in the access log."""
    if error.status < 500:
        return
    if isinstance(exc, APIError):
        fields = {"code": error.code, "status": error.status, **error.detail}
        log.warning("%s: %s", error.code, error.message, extra={"fields": fields})
    else:
        log.exception("error %s", during)


def setup_error_mapping(app: web.Application) -> None:
    """Add the middleware that turns exceptions into OpenAI error responses."""

    @web.middleware
    async def error_mapping(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            error = _routing_error(request, exc)
        except Exception as exc:  # noqa: BLE001  # every fault becomes an envelope; log_server_error logs it
            error = to_api_error(exc)
            log_server_error(exc, error, f"while handling {request.method} {request.path}")
        request[ERROR] = error  # for the request's record: its code and param
        return error_response(error, request)

    app.middlewares.append(error_mapping)
