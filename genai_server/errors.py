"""Typed errors, each carrying what the OpenAI error envelope needs.

Anything below the web layer raises one of these; ``error_mapping.py`` turns
them (and everything else) into ``{"error": {"message", "type", "param", "code"}}``.
Codes are strings: an integer code breaks the OpenAI Java SDK.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ValidationError


class APIError(Exception):
    """An error a client is shown, with its HTTP status and OpenAI type/code/param."""

    status: ClassVar[int] = 400
    error_type: ClassVar[str] = "invalid_request_error"
    default_code: ClassVar[str] = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}
        # For the log only, never the client: the cause behind a 5xx (an upstream's URL, errno, status).
        self.detail = detail or {}

    def envelope(self) -> dict[str, Any]:
        """The OpenAI error body."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    """400: a parameter is wrong, missing or not supported."""

    default_code = "invalid_parameter"


class ContextLengthExceeded(APIError):
    """400: the prompt plus the tokens asked for do not fit the model's context."""

    default_code = "context_length_exceeded"


class ModelNotFound(APIError):
    """404: no model with the id the client sent."""

    status = 404
    default_code = "model_not_found"


class InvalidApiKey(APIError):
    """401: no API key, or not one of the server's."""

    status = 401
    default_code = "invalid_api_key"


class Forbidden(APIError):
    """403: refused, e.g. a CORS preflight from an origin that is not allowed."""

    status = 403
    default_code = "forbidden"


class NotFound(APIError):
    """404: no such route."""

    status = 404
    default_code = "not_found"


class MethodNotAllowed(APIError):
    """405: the route exists, the method does not."""

    status = 405
    default_code = "method_not_allowed"


class Conflict(APIError):
    """409: the request conflicts with what the server is doing (unloading a model that is generating)."""

    status = 409
    default_code = "conflict"


class PayloadTooLarge(APIError):
    """413: the body is larger than the server accepts."""

    status = 413
    default_code = "request_too_large"


class RequestTimeout(APIError):
    """408: the client took too long to send its request."""

    status = 408
    default_code = "request_timeout"


class UnsupportedMediaType(APIError):
    """415: the body is not JSON."""

    status = 415
    default_code = "unsupported_media_type"


class RateLimited(APIError):
    """429: too many requests in flight; the client should retry after ``Retry-After`` seconds."""

    status = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"


class SloUnattainable(RateLimited):
    """429: the request's time-to-first-token objective cannot be met with the work already ahead of it."""

    default_code = "slo_unattainable"


class ServerError(APIError):
    """500: something failed inside the server; the details are in the log, not the response."""

    status = 500
    error_type = "server_error"
    default_code = "internal_error"


class ShuttingDown(APIError):
    """503: the server is stopping; this request was not finished."""

    status = 503
    error_type = "server_error"
    default_code = "shutting_down"


class ModelLoadFailed(ServerError):
    """500: the model named could not be loaded (its folder is broken, or its engine would not start)."""

    default_code = "model_loading_failed"


class ModelsBusy(APIError):
    """503: loading the model needs room, and every loaded model is generating."""

    status = 503
    error_type = "server_error"
    default_code = "models_busy"


class EngineFailure(ServerError):
    """500: the inference engine reported a failure for this request."""

    default_code = "engine_error"


class UpstreamError(APIError):
    """502: the upstream engine failed, answered with a 5xx, or sent something that is not its API."""

    status = 502
    error_type = "server_error"
    default_code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    """502: the upstream engine could not be reached."""

    default_code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    """504: the upstream engine did not answer in time."""

    status = 504
    default_code = "upstream_timeout"


class UpstreamRejected(APIError):
    """The upstream's own 4xx, passed on with its status and message."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code or "upstream_rejected", headers=headers)
        self.status = status  # type: ignore[misc]
        self.error_type = error_type or "invalid_request_error"  # type: ignore[misc]


class ModelLoadingFailed(Exception):
    """The model folder could not be loaded at start-up; the server must not start."""

    code = "model_loading_failed"


class UpstreamUnavailableAtStart(ModelLoadingFailed):
    """The upstream's models could not be listed at start-up: the server must not start, but a later try may work
    (the upstream may still be starting), unlike a model folder that cannot load."""

    code = "upstream_unavailable"


# Location parts pydantic adds for union members and validators; clients never wrote them.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _is_param_part(part: int | str) -> bool:
    return isinstance(part, int) or (part.isidentifier() and part not in _TYPE_TAGS)


def from_validation_error(exc: ValidationError) -> InvalidRequest:
    """A pydantic error as a 400 naming the offending parameter, e.g. ``messages.0.role``.

    Of several errors (a union reports one per member) the deepest is the most specific.
    """
    error = max(exc.errors(), key=lambda e: len(e["loc"]))
    param = ".".join(str(part) for part in error["loc"] if _is_param_part(part)) or None
    code = "missing_parameter" if error["type"] == "missing" else "invalid_parameter"
    message = error["msg"] if param is None else f"{param}: {error['msg']}"
    return InvalidRequest(message, param=param, code=code)
