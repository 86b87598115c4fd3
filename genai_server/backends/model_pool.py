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
from genai_server.backends.onnx import no_embeddings
from genai_server.errors import APIError, ModelLoadFailed, ModelsBusy, ServerError
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
        self,
        model_id: str,
        context_length: int | None,
        build: Callable[[], Backend],
        pool: ModelPool,
        footprint_mb: float = 0.0,
        ttl_s: float | None = None,
    ) -> None:
        self.model_id = model_id
        self.ttl_s = ttl_s  # its own idle time before unloading; None: the pool's
        self.footprint_mb = footprint_mb  # what it is counted as taking when loaded (MODELS_MEMORY_MB)
        self._context_length = context_length
        self._build = build
        self.pool = pool
        self.inner: Backend | None = None
        self.loading: asyncio.Task[None] | None = None
        self.closing: asyncio.Task[None] | None = None  # an engine being closed still holds its memory
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
        """Stop a load under way and unload (what still runs there ends with ``ShuttingDown``)."""
        await self.pool.stop()
        await self.cancel_load()
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
        """Its card, with its status and its context (the engine's once loaded, its config's until then)."""
        length = self._context_length
        if self.inner is not None:
            length = self.inner.model_cards()[0].context_length or length
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
        raise no_embeddings(self.model_id)

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
        if self.closing is not None:  # its previous engine still holds memory: gone first
            await asyncio.shield(self.closing)
        started = time.perf_counter()
        backend = self._build()
        try:
            async with asyncio.timeout(timeout_s):
                await backend.start()
        except BaseException as exc:
            # Closed aside: an engine that would not start may take its time to go (a thread to join).
            self._close_aside(backend)
            self.failure = _reason(exc)
            log.error("model could not be loaded", extra={"fields": {"model": self.model_id, "reason": self.failure}})
            raise
        self.inner, self.failure = backend, None
        self._loads += 1
        self._load_seconds = time.perf_counter() - started
        self.last_used = time.monotonic()

    async def unload(self) -> None:
        """Close the engine, freeing its memory and its kept conversations; until it is closed it counts as loaded
        (``closing``), and a request that comes meanwhile loads it anew once it is."""
        inner, self.inner = self.inner, None
        if inner is None:
            return
        self._unloads += 1
        self._close_aside(inner)
        if self.closing is not None:
            await asyncio.shield(self.closing)
        log.info("model unloaded", extra={"fields": {"model": self.model_id}})

    def engine_failed(self, exc: BaseException, engine: Backend) -> None:
        """``engine`` died and could not be restarted: if it is the model's engine now (not one since replaced),
        the model is unloaded and says why until it is loaded again."""
        if self.inner is not engine:
            return
        self.failure = _reason(exc)
        self.inner = None
        self._unloads += 1
        self._close_aside(engine)

    async def cancel_load(self) -> None:
        """Shutting down: a load under way is cancelled (its engine closed)."""
        loading = self.loading
        if loading is not None:
            loading.cancel()
            with contextlib.suppress(BaseException):
                await loading

    def _close_aside(self, backend: Backend) -> None:
        """Close ``backend`` in a task of its own, kept as ``closing`` until it is done."""
        self.closing = asyncio.get_running_loop().create_task(self._close(backend))

    async def _close(self, backend: Backend) -> None:
        try:
            await backend.close()
        except Exception:
            log.exception("closing a model failed", extra={"fields": {"model": self.model_id}})
        finally:
            self.closing = None

    async def _acquire(self) -> Backend:
        self.in_flight += 1  # from here it cannot be chosen to make room
        try:
            await self.pool.ensure_loaded(self)
            if self.inner is None:  # unloaded between its load and this request's turn (its engine died)
                raise ModelLoadFailed(f"The model '{self.model_id}' was unloaded: {self.failure or 'its engine ended'}")
        except BaseException:
            self._release()
            raise
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
            return _HeldStream(result, self._release)
        self._release()
        return result


class _HeldStream(AsyncGenerator[Any, None]):
    """A stream that holds its model until it ends, fails or is closed, once; closed before its first item too (an
    async generator that never started would skip its ``finally``: a client gone before the first chunk)."""

    def __init__(self, stream: AsyncGenerator[Any, None], release: Callable[[], None]) -> None:
        self._stream = stream
        self._release = release
        self._held = True

    async def asend(self, value: None) -> Any:
        try:
            return await self._stream.asend(value)
        except BaseException:
            self._let_go()
            raise

    async def athrow(self, typ: Any, val: Any = None, tb: Any = None, /) -> Any:
        try:
            return await self._stream.athrow(typ, val, tb)
        except BaseException:
            self._let_go()
            raise

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._let_go()

    def _let_go(self) -> None:
        if self._held:
            self._held = False
            self._release()


class ModelPool:
    """At most ``max_loaded`` of its models in memory; idle ones unloaded after ``ttl_s`` (0: never)."""

    def __init__(self, max_loaded: int, ttl_s: float, load_timeout_s: float, memory_mb: float | None = None) -> None:
        self.models: list[OnDemandBackend] = []
        self._max_loaded = max_loaded
        self._memory_mb = memory_mb
        self._ttl_s = ttl_s
        self._load_timeout_s = load_timeout_s
        self._room = asyncio.Lock()  # one load makes room at a time: two must not both count the same free place
        self._reserved: set[OnDemandBackend] = set()  # loads under way: their room is taken
        self._idle_timer: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the idle timer (once), if any model may be unloaded for idleness."""
        if self._idle_timer is None and any(self._ttl(model) > 0 for model in self.models):
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
        loading = model.loading
        try:
            # The request's own wait is bounded too: room may take a while to free (engines closing).
            async with asyncio.timeout(self._load_timeout_s * 2):
                await asyncio.shield(loading)
        except APIError:
            raise
        except TimeoutError:
            raise ModelLoadFailed(
                f"The model '{model.model_id}' did not load in time (MODEL_LOAD_TIMEOUT_S)",
                headers={"Retry-After": "5"},
            ) from None
        except Exception:  # noqa: BLE001 - any failure to load is this model's, said to its request
            raise ModelLoadFailed(f"The model '{model.model_id}' could not be loaded: {model.failure}") from None
        except asyncio.CancelledError:
            if not loading.cancelled():
                raise  # this request was cancelled (its client left): the load goes on for the others
            raise ModelLoadFailed(f"The model '{model.model_id}' was not loaded: the server is stopping") from None

    async def unload(self, model: OnDemandBackend) -> bool:
        """Unload ``model`` now, unless it is generating or loading (False)."""
        if model.in_flight or model.loading is not None:
            return False
        await model.unload()
        return True

    async def _load(self, model: OnDemandBackend) -> None:
        try:
            async with self._room:  # held while room is made, not while the engine loads
                await self._make_room(model)
                self._reserved.add(model)
            await model.load_now(self._load_timeout_s)
        finally:
            self._reserved.discard(model)
            model.loading = None

    def _fits(self, model: OnDemandBackend) -> bool:
        occupied = self._occupied(model)
        if len(occupied) >= self._max_loaded:
            return False
        used = sum(m.footprint_mb for m in occupied)
        return self._memory_mb is None or used + model.footprint_mb <= self._memory_mb

    def _occupied(self, model: OnDemandBackend) -> list[OnDemandBackend]:
        """The other models holding memory: loaded, loading, or still closing."""
        return [m for m in self.models if m is not model and (m.inner is not None or m in self._reserved or m.closing)]

    async def _make_room(self, model: OnDemandBackend) -> None:
        """Unload the least recently used idle models until one more fits, in count and in memory; an engine still
        closing is waited for."""
        if self._memory_mb is not None and model.footprint_mb > self._memory_mb:
            raise ModelLoadFailed(
                f"The model '{model.model_id}' needs about {model.footprint_mb:.0f} MB; MODELS_MEMORY_MB is "
                f"{self._memory_mb:.0f}"
            )
        while not self._fits(model):
            closing = [m.closing for m in self._occupied(model) if m.closing is not None]
            if closing:
                await asyncio.wait(closing)
                continue
            idle = [m for m in self.models if m.inner is not None and m.in_flight == 0 and m is not model]
            if not idle:
                raise ModelsBusy(
                    f"Every loaded model is generating (MAX_LOADED_MODELS={self._max_loaded}); "
                    f"'{model.model_id}' cannot be loaded now",
                    headers={"Retry-After": "5"},
                )
            victim = min(idle, key=lambda m: m.last_used)
            log.info("unloading the least recently used model", extra={"fields": {"model": victim.model_id}})
            await victim.unload()

    def _ttl(self, model: OnDemandBackend) -> float:
        return self._ttl_s if model.ttl_s is None else model.ttl_s

    async def _unload_idle(self) -> None:
        while True:
            await asyncio.sleep(min([self._ttl(model) / 2 for model in self.models if self._ttl(model) > 0] + [1.0]))
            now = time.monotonic()
            for model in self.models:
                ttl = self._ttl(model)
                if ttl > 0 and model.inner is not None and model.in_flight == 0 and now - model.last_used > ttl:
                    log.info("unloading an idle model", extra={"fields": {"model": model.model_id}})
                    try:
                        await model.unload()
                    except Exception:
                        log.exception("unloading an idle model failed", extra={"fields": {"model": model.model_id}})


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "it did not load in time (MODEL_LOAD_TIMEOUT_S)"
    return str(exc)[:500] or type(exc).__name__
