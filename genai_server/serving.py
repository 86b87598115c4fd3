"""The serving layer: routes each request to the backend serving its model. Knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from genai_server.backends import Backend, Response, Result
from genai_server.backends.model_pool import OnDemandBackend
from genai_server.errors import APIError, Conflict, InvalidRequest, ModelNotFound, ShuttingDown
from genai_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from genai_server.telemetry.clock import RequestTelemetry
from genai_server.telemetry.gpu import GpuMonitor

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """What one request may ask for, whatever the backend."""

    max_messages: int = 256  # MAX_MESSAGES
    max_tokens_limit: int = 4096  # MAX_TOKENS_LIMIT: per choice
    max_sequences: int = 16  # MAX_SEQUENCES_PER_REQUEST


class Serving:
    """Model ids to backends; every request is checked against the limits and timed the same way."""

    def __init__(self, backends: dict[str, Backend], gpu: GpuMonitor, limits: RequestLimits | None = None) -> None:
        self._backends = backends
        self._gpu = gpu
        self._limits = limits or RequestLimits()
        self._stopped = False

    async def start(self) -> None:
        """Start every backend in order; if one fails, release those already started and re-raise."""
        try:
            for backend in self._backends.values():
                await backend.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop serving: new requests get ``ShuttingDown``, every backend is closed (ending what still runs).
        Idempotent: the drain and the app's cleanup both call it."""
        if self._stopped:
            return
        self._stopped = True
        # Side by side: an engine process may take seconds to stop, and each backend's wait must not add up.
        await asyncio.gather(*(_close(backend) for backend in self._backends.values()))

    async def ready(self) -> dict[str, bool]:
        """Per model: whether its backend can serve now, every backend asked at once (one after another, 64 models
        behind one hung upstream took 128 s)."""
        if self._stopped:
            return dict.fromkeys(self._backends, False)
        answers = await asyncio.gather(*(backend.ready() for backend in self._backends.values()))
        return dict(zip(self._backends, answers, strict=True))

    @property
    def backends(self) -> dict[str, Backend]:
        """Each model id and its backend (read-only use: gauges read at scrape time)."""
        return dict(self._backends)

    @property
    def backend_names(self) -> dict[str, str]:
        """Each model id and the name of the backend serving it."""
        return {model_id: backend.name for model_id, backend in self._backends.items()}

    @property
    def default_model(self) -> str:
        """The first model, named by /health."""
        return next(iter(self._backends))

    def list_models(self) -> ModelList:
        """``GET /v1/models``: every model of every backend."""
        return ModelList(data=[self.get_model(model_id) for model_id in self._backends])

    def get_model(self, model_id: str) -> ModelCard:
        """``GET /v1/models/{id}``; unknown ids are a 404."""
        for card in self._backend(model_id).model_cards():
            if card.id == model_id:
                return card
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")

    async def chat(self, req: ChatCompletionRequest, stats: RequestTelemetry, owner: str = "") -> Result:
        """Route a chat completion; ``owner`` names who sent it (see ``cache_scope``)."""
        self._check_turns(len(req.messages), "messages")
        self._check_limit(req.limit, req.limit_param)
        self._check_sequences(req.n)
        backend = self._start(req.model, stats)
        return await _timed(backend.chat(req, stats, cache_scope(owner, req.cache_salt)), stats, self._stopping)

    async def complete(self, req: CompletionRequest, stats: RequestTelemetry, owner: str = "") -> Result:
        """Route a text completion; ``owner`` as for ``chat``."""
        self._check_limit(req.limit, req.limit_param)
        self._check_sequences(req.n * len(req.prompts()))
        backend = self._start(req.model, stats)
        return await _timed(backend.complete(req, stats, cache_scope(owner, req.cache_salt)), stats, self._stopping)

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """A text's or a conversation's tokens, by the tokenizer of the model named (the first without one)."""
        if self._stopped:
            raise ShuttingDown("The server is shutting down")
        return await self._backend(req.model or self.default_model).tokenize(req)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        """Token ids as text, by the tokenizer of the model named (the first without one)."""
        return await self._backend(req.model or self.default_model).detokenize(req)

    async def embeddings(self, body: dict[str, Any], stats: RequestTelemetry) -> dict[str, Any]:
        """``/v1/embeddings`` to the backend of the model named, timed as a request is."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model is required", param="model", code="missing_parameter")
        backend = self._start(model, stats)
        result = await _timed(backend.embeddings(body, stats), stats, self._stopping)
        assert isinstance(result, dict)
        return result

    async def load_model(self, model_id: str) -> None:
        """Load a model of MODELS_DIR now (again, after a failure); one loaded at start-up is always loaded."""
        if self._stopped:
            raise ShuttingDown("The server is shutting down; no model is loaded now")
        backend = self._backend(model_id)
        if isinstance(backend, OnDemandBackend):
            await backend.pool.load(backend)

    async def unload_model(self, model_id: str) -> None:
        """Unload a model of MODELS_DIR now; one that is generating stays (409), one loaded at start-up too (400)."""
        backend = self._backend(model_id)
        if not isinstance(backend, OnDemandBackend):
            raise InvalidRequest(f"The model '{model_id}' is loaded at start-up, not on demand", param="model")
        if not await backend.pool.unload(backend):
            raise Conflict(f"The model '{model_id}' is generating or loading; it was not unloaded", param="model")

    def natively(self, model_id: str, api: str) -> bool:
        """Whether the model's backend relays ``api`` (responses, messages) as it is; False for an unknown model (its
        request is translated, and refused as unknown there)."""
        backend = self._backends.get(model_id)
        return backend is not None and backend.serves_natively(api)

    async def relay_native(
        self, api: str, model_id: str, body: dict[str, Any], stats: RequestTelemetry, answer: AnswerShape
    ) -> Result:
        """``api``'s request relayed as it came to the model's engine, timed as chat is, within the same limits
        (turns, tokens per answer); ``answer`` says which of its stream's events carries the usage (where the clock
        stops) and how our figures go on it."""
        self._check_native(api, body)
        backend = self._start(model_id, stats)
        return await _timed(backend.relay_native(api, body, stats), stats, self._stopping, answer)

    async def native_request(self, model_id: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Another route of a natively relayed API, to the model's engine."""
        return await self._backend(model_id).native_request(method, path, body)

    def _check_native(self, api: str, body: dict[str, Any]) -> None:
        """MAX_MESSAGES and MAX_TOKENS_LIMIT for a request relayed as it came (its shape is the engine's to check)."""
        turns_param, limit_param = ("input", "max_output_tokens") if api == "responses" else ("messages", "max_tokens")
        turns, limit = body.get(turns_param), body.get(limit_param)
        if isinstance(turns, list):
            self._check_turns(len(turns), turns_param)
        if isinstance(limit, int):
            self._check_limit(limit, limit_param)

    def _check_turns(self, turns: int, param: str) -> None:
        if turns > self._limits.max_messages:
            raise InvalidRequest(f"At most {self._limits.max_messages} messages per request", param=param)

    def _check_limit(self, limit: int | None, param: str) -> None:
        """MAX_TOKENS_LIMIT, for the parameter the client named the limit with."""
        most = self._limits.max_tokens_limit
        if limit is not None and limit > most:
            raise InvalidRequest(f"At most {most} tokens per choice (MAX_TOKENS_LIMIT)", param=param)

    def _check_sequences(self, sequences: int) -> None:
        """Each sequence holds a KV cache: what one request may ask for is counted in sequences, not requests."""
        if sequences > self._limits.max_sequences:
            raise InvalidRequest(
                f"This request asks for {sequences} sequences (n x prompts); at most "
                f"{self._limits.max_sequences} are allowed (MAX_SEQUENCES_PER_REQUEST)",
                param="n",
            )

    def _stopping(self) -> bool:
        return self._stopped

    def _start(self, model_id: str, stats: RequestTelemetry) -> Backend:
        if self._stopped:
            raise ShuttingDown("The server is shutting down; no new generation starts")
        backend = self._backend(model_id)  # before labelling: an unknown id must not become a metrics label
        stats.model, stats.backend = model_id, backend.name
        stats.watch_gpu(self._gpu)
        return backend

    def _backend(self, model_id: str) -> Backend:
        backend = self._backends.get(model_id)
        if backend is None:
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
        return backend


def cache_scope(owner: str, salt: str | None) -> str:
    """Whose KV caches a request may continue: its owner's (an API key's fingerprint; "" on an open server, where
    every client is the same owner), further split by the client's ``cache_salt`` (vLLM's field) when it sends one.
    Scoped, because whether a prompt continued a kept conversation shows in ``cached_tokens`` and in the time to
    first token: across owners, one client could test guesses of another's prompts."""
    if not owner and salt is None:
        return ""
    return hashlib.sha256(f"{owner}\0{salt or ''}".encode()).hexdigest()


@dataclass(frozen=True)
class AnswerShape:
    """Where an API's answer takes our figures: which streamed item carries the final usage (the clock stops
    there, and the figures go out with it), and how the figures (``metrics``, ``performance``) are put on an item
    or a whole answer. Chat's and completions' by default."""

    final: Callable[[Response], bool]
    attach: Callable[[Response, dict[str, Any]], Response]


async def _timed(
    pending: Awaitable[Result], stats: RequestTelemetry, stopping: Callable[[], bool], shape: AnswerShape | None = None
) -> Result:
    """The backend's answer with the request's clock stopped where its generation ends, once, here: after a whole
    response, at a stream's usage chunk (its figures go out with it) or at the stream's end, or when the backend
    fails or the client leaves. The figures go on the answer where its usage does. A backend that fails because
    the server is stopping it (``stopping``: an upstream session closed under a relayed request) is the server
    shutting down, not the upstream failing: 503 ``shutting_down`` (it was a 500, or a dropped connection)."""
    shape = shape or CHAT_SHAPE
    try:
        result = await _shut_down_if_stopping(pending, stopping)
    except BaseException:
        stats.finish()  # refused or failed before any answer: stop watching the GPU for it
        raise
    if isinstance(result, AsyncGenerator):
        return _TimedStream(result, stats, stopping, shape)
    stats.finish()
    return shape.attach(result, _figures(stats))


class _TimedStream(AsyncGenerator[Response, None]):
    """A backend's stream with the request's clock stopped at its usage chunk, its end, its failure or its
    cancellation; closing it closes the backend's stream and stops the clock even if it never started (an async
    generator that never started would skip its ``finally``: a client gone before the first chunk)."""

    def __init__(
        self,
        chunks: AsyncGenerator[Response, None],
        stats: RequestTelemetry,
        stopping: Callable[[], bool],
        shape: AnswerShape,
    ) -> None:
        self._chunks = chunks
        self._stats = stats
        self._stopping = stopping
        self._shape = shape

    async def asend(self, value: None) -> Response:
        try:
            chunk = await _shut_down_if_stopping(self._chunks.asend(value), self._stopping)
        except BaseException:  # its end, its failure, or the client leaving: generation is over
            self._stats.finish()
            raise
        if not self._shape.final(chunk):
            return chunk
        self._stats.finish()
        return self._shape.attach(chunk, _figures(self._stats))

    async def athrow(self, typ: Any, val: Any = None, tb: Any = None, /) -> Response:
        try:
            return await self._chunks.athrow(typ, val, tb)
        except BaseException:
            self._stats.finish()
            raise

    async def aclose(self) -> None:
        try:
            await self._chunks.aclose()  # a client that left: its generation is cancelled now
        finally:
            self._stats.finish()


async def _shut_down_if_stopping(pending: Awaitable[T], stopping: Callable[[], bool]) -> T:
    try:
        return await pending
    except APIError as exc:
        # Only a failure of the server's side (an upstream cut, an engine stopped): a client's own error stays its.
        if stopping() and exc.status >= 500 and not isinstance(exc, ShuttingDown):
            raise ShuttingDown("The server is shutting down; this generation was not finished") from exc
        raise


def _final_usage(chunk: Response) -> bool:
    """A chunk with the answer's usage: one with usage and no choice still generating (the usage-only last chunk,
    or llama-server's last chunk with its finish reason). vLLM's continuous usage puts usage on every chunk: the
    clock must not stop at the first."""
    if _usage(chunk) is None:
        return False
    choices = chunk.get("choices") if isinstance(chunk, dict) else getattr(chunk, "choices", None)
    return all(_finish(choice) for choice in choices or [])


def _finish(choice: object) -> object:
    return choice.get("finish_reason") if isinstance(choice, dict) else getattr(choice, "finish_reason", None)


def _usage(response: Response) -> object:
    return response.get("usage") if isinstance(response, dict) else getattr(response, "usage", None)


def _figures(stats: RequestTelemetry) -> dict[str, Any]:
    """Our figures: ``metrics``, and ``performance`` as the original design called them."""
    return {"metrics": stats.metrics(), "performance": stats.performance()}


def _with_figures(response: Response, figures: dict[str, Any]) -> Response:
    """Our figures beside the usage, at the top of a response or chunk (ours, or relayed JSON)."""
    if isinstance(response, dict):
        response.update((name, value.model_dump()) for name, value in figures.items())
        return response
    return response.model_copy(update=figures)


CHAT_SHAPE = AnswerShape(final=_final_usage, attach=_with_figures)


async def _close(backend: Backend) -> None:
    try:
        await backend.close()
    except Exception:  # one backend failing to close must not keep the others open
        log.exception("closing the %s backend failed", backend.name)
