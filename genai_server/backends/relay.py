"""The relay loop every backend relaying to an engine elsewhere shares, and its one retry budget.

A request is posted to the replica the replica set picks (attempt 1) and the first item of its stream awaited. If
the post fails, or the stream fails before that first item, nothing has reached the client; when the failure is one
another replica may not repeat (``_retryable``), the request is posted once more, to a replica it has not tried
(attempt 2). That is all: at most ``MAX_ATTEMPTS`` posts per request, never two to the same replica, and with one
replica no second attempt. Once the first item is out, nothing is retried: the client would see it twice. (Below
this, the upstream client posts once more on a fresh connection when a kept-alive one turns out closed before any
answer: that request never reached the upstream's engine, ``upstream_client.py``.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import aiohttp

from genai_server.backends import Result
from genai_server.backends.affinity import Prefixes, conversation_prefixes
from genai_server.backends.replicas import LOAD_FACTOR, Balance, Replica, ReplicaSet
from genai_server.backends.upstream_client import UpstreamClient, json_within
from genai_server.errors import InvalidRequest, UpstreamError, UpstreamTimeout
from genai_server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    now,
)
from genai_server.telemetry.clock import RequestTelemetry
from genai_server.telemetry.load import BackendLoad

log = logging.getLogger(__name__)

T = TypeVar("T")

# Posts one request may make: the first, and one more on another replica if that failed before the client saw any.
MAX_ATTEMPTS = 2
# A whole JSON answer may be this large: embeddings (a slot each), 2048 inputs of 4096 dimensions as JSON fit; the
# answers of routes that take no slot (tokens, a kept response) far less.
MAX_JSON_BYTES = 256 * 1024 * 1024
SMALL_JSON_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    """What a relaying backend is built from (``factory.py`` fills it in from a model's entry and the settings)."""

    model_id: str  # the id clients ask for
    upstream_model: str  # the upstream's name for the model
    urls: tuple[str, ...]  # one per replica, at least one
    timeout: aiohttp.ClientTimeout
    api_key: str | None = field(default=None, repr=False)  # sent upstream as a bearer token
    always_usage: bool = False  # STREAM_USAGE_ALWAYS: streams end with usage even when the client did not ask
    max_tokens_limit: int = 4096  # MAX_TOKENS_LIMIT: a choice's tokens when the client set no limit
    balance: Balance = "cache_aware"
    load_factor: float = LOAD_FACTOR  # cache_aware: how far over the mean in flight a conversation's replica may go
    native_apis: frozenset[str] = frozenset()  # the APIs the upstream serves itself: relayed as they are


class RelayBackend:
    """What every backend relaying to an engine elsewhere shares: the one model it serves under our id, the
    upstream's name for it, the upstream replicas it owns from ``start`` to ``close``, and the relay loop."""

    name: str
    # Where a replica is asked whether it answers (any status below 500 is yes).
    probe_path: ClassVar[str]

    def __init__(self, config: RelayConfig) -> None:
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        clients = [
            UpstreamClient(url, config.timeout, headers=headers, probe_path=self.probe_path) for url in config.urls
        ]
        self._replicas = ReplicaSet(clients, config.balance, config.load_factor)
        self.model_id = config.model_id
        self._upstream_model = config.upstream_model
        self._always_usage = config.always_usage
        self._max_tokens_limit = config.max_tokens_limit
        self._native_apis = config.native_apis
        self._created = now()

    async def start(self) -> None:
        """Open the sessions to the upstream's replicas."""
        await self._replicas.start()

    async def close(self) -> None:
        """Close them; relayed streams still open end with an error."""
        await self._replicas.close()

    async def ready(self) -> bool:
        """A replica of the upstream answers."""
        return await self._replicas.ready()

    def load(self) -> BackendLoad:
        """Its replicas' figures; what waits or fills a KV cache is the upstream's to report."""
        return BackendLoad(replicas=self._replicas.load())

    def model_cards(self) -> list[ModelCard]:
        """The one model this backend relays to."""
        return [ModelCard(id=self.model_id, created=self._created)]

    def serves_natively(self, api: str) -> bool:
        """Whether ``api`` (responses, messages) is relayed to the upstream as it is."""
        return api in self._native_apis

    async def relay_native(self, api: str, body: dict[str, Any], stats: RequestTelemetry) -> Result:
        """Not an API this engine's adapter relays as it is (the ``openai`` one does)."""
        raise self._unsupported(f"/v1/{api} as it is")

    async def native_request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """As ``relay_native``."""
        raise self._unsupported(path)

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """Not an API this engine's adapter relays (the ``openai`` one does)."""
        raise self._unsupported("/tokenize")

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        """As ``tokenize``."""
        raise self._unsupported("/detokenize")

    async def embeddings(self, body: dict[str, Any], stats: RequestTelemetry) -> dict[str, Any]:
        """As ``tokenize``."""
        raise self._unsupported("/v1/embeddings")

    def _unsupported(self, route: str) -> InvalidRequest:
        return InvalidRequest(
            f"The {self.name} backend serving '{self.model_id}' does not relay {route}",
            param="model",
            code="unsupported_by_backend",
        )

    async def _post_json(
        self,
        path: str,
        body: dict[str, Any] | None,
        *,
        at_root: bool = False,
        method: str = "POST",
        max_bytes: int = SMALL_JSON_BYTES,
        prefixes: Prefixes | None = None,
        stats: RequestTelemetry | None = None,
    ) -> Any:
        """One request and its whole JSON answer (at most ``max_bytes``), to the replica the set picks (following
        ``prefixes``, a conversation's, when given); ``stats`` are told which replica it was."""
        replica = self._replicas.pick(prefixes=prefixes)
        if stats is not None:
            stats.replica = replica.name
        try:
            response = await self._replicas.post(replica, path, body, at_root=at_root, method=method)
            return await json_within(response, max_bytes)
        except UpstreamError as exc:
            self._replicas.failed(replica, exc)
            raise

    def _max_tokens(self, req: SamplingRequest) -> int:
        """The tokens a choice may bring: the client's limit, else MAX_TOKENS_LIMIT; it bounds an endless upstream."""
        return req.limit or self._max_tokens_limit

    async def _relay_stream(
        self,
        path: str,
        body: dict[str, Any],
        stats: RequestTelemetry,
        read: Callable[[aiohttp.ClientResponse], AsyncGenerator[T, None]],
    ) -> AsyncGenerator[T, None]:
        """The stream ``read`` makes of the upstream's response to ``body``, its first item already received: an
        upstream that fails before it is an HTTP error status for the client, not a 200 stream that then carries an
        error. Such a failure is counted against its replica, and the request goes to one it has not tried if the
        budget and the failure allow (see the module's docstring)."""
        tried: list[Replica] = []
        prefixes = self._prefixes(body)
        while True:
            replica = self._replicas.pick(tried, prefixes)
            tried.append(replica)
            try:
                return await self._attempt(replica, path, body, stats, read)
            except UpstreamError as exc:
                self._replicas.failed(replica, exc)
                if not self._another_attempt(tried, exc):
                    raise
                fields = {"replica": replica.name, "code": exc.code, "message": exc.message, **exc.detail}
                log.warning("retrying on another replica", extra={"fields": fields})
            stats.on_retry()

    def _prefixes(self, body: dict[str, Any]) -> Prefixes | None:
        """The conversation ``body`` continues, when the replica set follows conversations to their replica."""
        return conversation_prefixes(body) if self._replicas.follows_prefixes else None

    def _wrote(self, response_id: Any, stats: RequestTelemetry) -> None:
        """The replica that served ``stats``'s request wrote the response ``response_id`` (kept there)."""
        if isinstance(response_id, str):
            self._replicas.remember_response(response_id, stats.replica)

    def _another_attempt(self, tried: list[Replica], exc: UpstreamError) -> bool:
        """Whether a request that failed before reaching its client is posted again: the budget has a post left, a
        replica it has not tried is there to take it, and the failure is one that replica may not repeat."""
        untried = len(self._replicas.replicas) - len(tried)
        return len(tried) < MAX_ATTEMPTS and untried > 0 and _retryable(exc)

    async def _attempt(
        self,
        replica: Replica,
        path: str,
        body: dict[str, Any],
        stats: RequestTelemetry,
        read: Callable[[aiohttp.ClientResponse], AsyncGenerator[T, None]],
    ) -> AsyncGenerator[T, None]:
        """One post to ``replica``, and the first item of its stream."""
        response = await self._replicas.post(replica, path, body)
        stats.on_admitted(time.perf_counter())  # our part of the wait ends when the upstream has the request
        stats.replica = replica.name  # told, for the per-replica TTFT and the log; the loop never reads it back
        return await _first_awaited(read(response))


def _retryable(exc: UpstreamError) -> bool:
    """Nothing reached the client yet and another replica may do better: it could not connect, dropped the request
    before answering, failed in its stream before the first item, or answered 5xx. Not a timeout (another replica
    would get the same slow request), nor a redirect or a refusal of our credentials. (An upstream's 4xx is the
    client's error, passed on as ``UpstreamRejected``: it never comes here.)"""
    if isinstance(exc, UpstreamTimeout):
        return False
    status = exc.detail.get("upstream_status")
    return status is None or (isinstance(status, int) and status >= 500)


async def _first_awaited(stream: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        raise UpstreamError("The upstream engine sent nothing") from None
    return _prepend(first, stream)


async def _prepend(first: T, rest: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """``first``, then the rest; closing it closes the rest (and so the upstream request)."""
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()
