"""Models loaded when asked (MODELS_DIR): each model folder is a backend that loads its engine on its first request
and unloads it when idle, and one pool keeps at most MAX_LOADED_MODELS in memory.

- A request for an unloaded model loads it and waits (at most MODEL_LOAD_TIMEOUT_S); requests that come while it
  loads wait on that one load.
- Loading one more than the pool holds first unloads the least recently used idle model; one that is generating is
  never unloaded, and when every loaded model is busy the request gets 503 with ``Retry-After``.
- An idle model is unloaded after MODEL_TTL_S (0: kept until evicted or asked to go).
- A model that fails to load answers its requests with that failure (``model_loading_failed``) until it is asked to
  load again; the others serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from genai_server.backends import Backend, Result
from genai_server.errors import APIError, InvalidRequest, ModelLoadFailed, ModelsBusy, ServerError
from genai_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    TokenizeRequest,
    TokenizeResponse,
)
from genai_server.telemetry.clock import RequestTelemetry
from genai_server.telemetry.load import BackendLoad, Residency

log = logging.getLogger(__name__)


class OnDemandBackend:
    """One model folder's backend, loaded when asked (``build`` makes the real one, not yet started)."""

    name = "onnx"

    def __init__(
        self, model_id: str, context_length: int | None, build: Callable[[], Backend], pool: ModelPool
    ) -> None:
        self.model_id = model_id
        self._context_length = context_length
        self._build = build
        self.pool = pool
        self.inner: Backend | None = None
        self.loading: asyncio.Task[None] | None = None
        self.failure: str | None = None
        self.in_flight = 0  # requests using it now, or waiting for it to load
        self.last_used = time.monotonic()
        self._loads = 0
        self._unloads = 0
        self._load_seconds: float | None = None
        self._created = int(time.time())
        pool.models.append(self)

    @property
    def status(self) -> str:
        """``loaded``, ``loading``, ``unloaded`` or ``failed``."""
        if self.inner is not None:
            return "loaded"
        if self.loading is not None:
            return "loading"
        return "failed" if self.failure is not None else "unloaded"

    async def start(self) -> None:
        """Nothing is loaded at start-up; the pool's idle timer starts."""
        self.pool.start()

    async def close(self) -> None:
        """Unload (what still runs there ends with ``ShuttingDown``)."""
        await self.pool.stop()
        await self.unload()

    async def ready(self) -> bool:
        """Ready to load when asked: a model that failed answers its own requests with the failure."""
        return True

    def load(self) -> BackendLoad:
        """Its engine's load while loaded, and whether it is."""
        inner = self.inner.load() if self.inner is not None else BackendLoad()
        residency = Residency(
            loaded=self.inner is not None,
            loads=self._loads,
            unloads=self._unloads,
            load_seconds=self._load_seconds,
        )
        return BackendLoad(waiting=inner.waiting, kv_cache_usage=inner.kv_cache_usage, residency=residency)

    def model_cards(self) -> list[ModelCard]:
        """Its card, with its status and its context (from its config while it is not loaded)."""
        length = self._context_length
        return [
            ModelCard(
                id=self.model_id, created=self._created, max_model_len=length, context_length=length, status=self.status
            )
        ]

    async def chat(self, req: ChatCompletionRequest, stats: RequestTelemetry, cache_scope: str = "") -> Result:
        """As the loaded engine answers it, loading it first."""
        backend = await self._acquire()
        return await self._held(backend.chat(req, stats, cache_scope))

    async def complete(self, req: CompletionRequest, stats: RequestTelemetry, cache_scope: str = "") -> Result:
        """As ``chat``."""
        backend = await self._acquire()
        return await self._held(backend.complete(req, stats, cache_scope))

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """With the model's tokenizer, loading it first."""
        backend = await self._acquire()
        try:
            return await backend.tokenize(req)
        finally:
            self._release()

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        """As ``tokenize``."""
        backend = await self._acquire()
        try:
            return await backend.detokenize(req)
        finally:
            self._release()

    async def embeddings(self, body: dict[str, Any], stats: RequestTelemetry) -> dict[str, Any]:
        """A generative model has none to give: refused without loading it for that."""
        raise InvalidRequest(
            f"The model '{self.model_id}' is a generative ONNX Runtime GenAI model and serves no embeddings",
            param="model",
            code="model_not_supported",
        )

    def serves_natively(self, api: str) -> bool:
        """An embedded engine speaks chat only."""
        return False

    async def relay_native(self, api: str, body: dict[str, Any], stats: RequestTelemetry) -> Result:
        """Never asked (``serves_natively``)."""
        raise ServerError(f"/v1/{api} is translated for the embedded engine")

    async def native_request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """As ``relay_native``."""
        raise ServerError(f"{path} is not relayed for the embedded engine")

    # ---- the pool's side --------------------------------------------------------------------------------------

    async def load_now(self, timeout_s: float) -> None:
        """Load the engine (the pool made room first); a failure is kept and answers the model's requests."""
        started = time.perf_counter()
        backend = self._build()
        try:
            async with asyncio.timeout(timeout_s):
                await backend.start()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await backend.close()
            self.failure = _reason(exc)
            log.error("model could not be loaded", extra={"fields": {"model": self.model_id, "reason": self.failure}})
            raise
        self.inner, self.failure = backend, None
        self._loads += 1
        self._load_seconds = time.perf_counter() - started
        self.last_used = time.monotonic()

    async def unload(self) -> None:
        """Close the engine, freeing its memory and its kept conversations; a request that comes meanwhile loads it
        anew."""
        inner, self.inner = self.inner, None
        if inner is None:
            return
        self._unloads += 1
        await inner.close()
        log.info("model unloaded", extra={"fields": {"model": self.model_id}})

    def engine_failed(self, exc: BaseException) -> None:
        """Its engine died and could not be restarted: the model is unloaded and says why until loaded again."""
        self.failure = _reason(exc)
        inner, self.inner = self.inner, None
        if inner is not None:
            self._unloads += 1
            asyncio.get_running_loop().create_task(inner.close())

    async def _acquire(self) -> Backend:
        self.in_flight += 1  # from here it cannot be chosen to make room
        try:
            await self.pool.ensure_loaded(self)
        except BaseException:
            self._release()
            raise
        assert self.inner is not None
        return self.inner

    def _release(self) -> None:
        self.in_flight -= 1
        self.last_used = time.monotonic()

    async def _held(self, pending: Awaitable[Result]) -> Result:
        """The answer, the model held until it is whole (a stream: until it is closed)."""
        try:
            result = await pending
        except BaseException:
            self._release()
            raise
        if isinstance(result, AsyncGenerator):
            return self._released_at_end(result)
        self._release()
        return result

    async def _released_at_end(self, stream: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()
            self._release()


class ModelPool:
    """At most ``max_loaded`` of its models in memory; idle ones unloaded after ``ttl_s`` (0: never)."""

    def __init__(self, max_loaded: int, ttl_s: float, load_timeout_s: float) -> None:
        self.models: list[OnDemandBackend] = []
        self._max_loaded = max_loaded
        self._ttl_s = ttl_s
        self._load_timeout_s = load_timeout_s
        self._room = asyncio.Lock()  # one load makes room at a time: two must not both count the same free place
        self._idle_timer: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the idle timer (once)."""
        if self._ttl_s > 0 and self._idle_timer is None:
            self._idle_timer = asyncio.get_running_loop().create_task(self._unload_idle())

    async def stop(self) -> None:
        """Stop the idle timer."""
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer

    async def ensure_loaded(self, model: OnDemandBackend) -> None:
        """Return once ``model`` is loaded: at once, after the load under way, or after loading it now."""
        if model.inner is not None:
            return
        if model.failure is not None and model.loading is None:
            raise ModelLoadFailed(f"The model '{model.model_id}' could not be loaded: {model.failure}")
        await self.load(model)

    async def load(self, model: OnDemandBackend) -> None:
        """Load ``model`` (again, after a failure), or wait for the load under way: one load however many ask."""
        if model.inner is not None:
            return
        if model.loading is None:
            model.failure = None
            model.loading = asyncio.get_running_loop().create_task(self._load(model))
        try:
            await asyncio.shield(model.loading)
        except APIError:
            raise
        except Exception:  # noqa: BLE001 - any failure to load is this model's, said to its request
            raise ModelLoadFailed(f"The model '{model.model_id}' could not be loaded: {model.failure}") from None

    async def unload(self, model: OnDemandBackend) -> bool:
        """Unload ``model`` now, unless it is generating (False)."""
        if model.in_flight:
            return False
        await model.unload()
        return True

    async def _load(self, model: OnDemandBackend) -> None:
        try:
            async with self._room:
                await self._make_room(model)
                await model.load_now(self._load_timeout_s)
        finally:
            model.loading = None

    async def _make_room(self, model: OnDemandBackend) -> None:
        """Unload the least recently used idle models until one more fits."""
        while len([m for m in self.models if m.inner is not None and m is not model]) >= self._max_loaded:
            idle = [m for m in self.models if m.inner is not None and m.in_flight == 0]
            if not idle:
                raise ModelsBusy(
                    f"Every loaded model is generating (MAX_LOADED_MODELS={self._max_loaded}); "
                    f"'{model.model_id}' cannot be loaded now",
                    headers={"Retry-After": "5"},
                )
            victim = min(idle, key=lambda m: m.last_used)
            log.info("unloading the least recently used model", extra={"fields": {"model": victim.model_id}})
            await victim.unload()

    async def _unload_idle(self) -> None:
        while True:
            await asyncio.sleep(min(self._ttl_s / 2, 1.0))
            now = time.monotonic()
            for model in self.models:
                if model.inner is not None and model.in_flight == 0 and now - model.last_used > self._ttl_s:
                    log.info("unloading an idle model", extra={"fields": {"model": model.model_id}})
                    await model.unload()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "it did not load in time (MODEL_LOAD_TIMEOUT_S)"
    return str(exc)[:500] or type(exc).__name__
