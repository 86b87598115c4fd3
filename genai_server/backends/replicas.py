"""Several replicas of one upstream engine behind one model id: which one takes a request, and which are healthy.

Each request goes to the healthy replica with the fewest requests in flight from this gateway (ties broken at
random), or in turn (``round_robin``, kept to compare against). A replica is ejected when its health probe fails or a
request cannot connect to it, and re-admitted when its probe answers again. A request that fails before its first
byte (connection refused, or a 5xx status) is tried once more on another replica here; one whose stream breaks
before its first token is, by the backend (``RelayBackend._open_stream``). After that nothing is retried, since the
client would see tokens twice. With every replica ejected, requests still go to the least busy
one: a stale health state must not turn a brief failure into a certain one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from genai_server.backends.upstream import TrackedResponse, UpstreamClient
from genai_server.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger(__name__)

Balance = Literal["least_in_flight", "round_robin"]
# How often every replica's health probe runs while the gateway serves.
HEALTH_INTERVAL_S = 2.0


@dataclass
class Replica:
    """One upstream address and what the gateway knows of it."""

    client: UpstreamClient
    name: str  # its URL without credentials: a metrics label and a log field
    in_flight: int = 0
    healthy: bool = True
    requests: int = 0
    errors: int = 0
    probed: bool = field(default=False, repr=False)


def replica_name(url: str) -> str:
    """A URL as it may be shown: without user and password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}".rstrip("/")


class ReplicaSet:
    """The replicas of one upstream: ``post`` picks one (and a second if the first fails before its first byte)."""

    def __init__(self, clients: list[UpstreamClient], balance: Balance = "least_in_flight") -> None:
        self.replicas = [Replica(client, replica_name(client.base_url)) for client in clients]
        self._balance = balance
        self._turn = itertools.count()
        self._health: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open every replica's session; with several, start probing their health."""
        for replica in self.replicas:
            await replica.client.start()
        if self.retries_possible:  # one replica alone is probed when readiness is asked
            self._health = asyncio.create_task(self._probe_forever())

    async def close(self) -> None:
        """Stop probing and close every session."""
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
        for replica in self.replicas:
            await replica.client.close()

    async def ready(self) -> bool:
        """At least one replica answers. One replica alone is probed when asked (at most once a second)."""
        if not self.retries_possible:
            replica = self.replicas[0]
            self._update(replica, await replica.client.ready())
        elif not any(replica.probed for replica in self.replicas):
            await self._probe_all()
        return any(replica.healthy for replica in self.replicas)

    async def post(self, path: str, body: dict[str, Any], avoid: str | None = None) -> aiohttp.ClientResponse:
        """POST to a replica (not ``avoid`` if another exists); a failure before any byte is tried once more on
        another one. The response's ``replica`` names the one that answered."""
        first = self._pick(avoid)
        try:
            return await self._post(first, path, body)
        except UpstreamError as exc:
            if not self._retry_elsewhere(first.name, exc):
                raise
        return await self._post(self._pick(first.name), path, body)

    @property
    def retries_possible(self) -> bool:
        """Whether a failed request has another replica to go to."""
        return len(self.replicas) > 1

    def failed_before_first_token(self, name: str, exc: UpstreamError) -> bool:
        """A response of replica ``name`` failed before its first token reached the client: counted against it, as
        a failed post is; True when the request should go to another replica (by the rule a failed post follows)."""
        for replica in self.replicas:
            if replica.name == name:
                replica.errors += 1
        return self._retry_elsewhere(name, exc)

    def _retry_elsewhere(self, name: str, exc: UpstreamError) -> bool:
        """Whether a request that failed on replica ``name`` before reaching its client goes to another (logged)."""
        if not (_retryable(exc) and self.retries_possible):
            return False
        fields = {"replica": name, "code": exc.code, "message": exc.message, **exc.detail}
        log.warning("retrying on another replica", extra={"fields": fields})
        return True

    def _pick(self, avoid: str | None) -> Replica:
        candidates = [r for r in self.replicas if r.name != avoid] or self.replicas
        healthy = [r for r in candidates if r.healthy] or candidates
        if self._balance == "round_robin":
            return healthy[next(self._turn) % len(healthy)]
        fewest = min(r.in_flight for r in healthy)
        return random.choice([r for r in healthy if r.in_flight == fewest])

    async def _post(self, replica: Replica, path: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
        replica.in_flight += 1
        replica.requests += 1
        try:
            response = await replica.client.post(path, body)
        except UpstreamError as exc:
            replica.in_flight -= 1
            replica.errors += 1
            if isinstance(exc, UpstreamUnavailable) and self.retries_possible:
                self._eject(replica, exc.detail.get("cause", exc.message))
            raise
        except BaseException:
            replica.in_flight -= 1
            raise
        if isinstance(response, TrackedResponse):
            response.on_close = lambda: _release(replica)
            response.replica = replica.name
        else:  # pragma: no cover - every session of ours makes TrackedResponses
            _release(replica)
        return response

    def _eject(self, replica: Replica, cause: str) -> None:
        if replica.healthy:
            replica.healthy = False
            log.warning("replica ejected", extra={"fields": {"replica": replica.name, "cause": cause}})

    async def _probe_forever(self) -> None:
        while True:
            try:
                await self._probe_all()
            except Exception:  # a probe that fails in a way we did not foresee must not end health checking
                log.exception("health probing failed; trying again in %g s", HEALTH_INTERVAL_S)
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def _probe_all(self) -> None:
        answers = await asyncio.gather(*(replica.client.probe() for replica in self.replicas))
        for replica, answer in zip(self.replicas, answers, strict=True):
            self._update(replica, answer)

    def _update(self, replica: Replica, answer: bool) -> None:
        """A probe's answer: a replica that fails is ejected, one that answers again re-admitted (each logged once)."""
        replica.probed = True
        if answer and not replica.healthy:
            replica.healthy = True
            log.info("replica re-admitted", extra={"fields": {"replica": replica.name}})
        elif not answer:
            self._eject(replica, "its health probe failed")


def _release(replica: Replica) -> None:
    replica.in_flight -= 1


def _retryable(exc: UpstreamError) -> bool:
    """Nothing reached the client yet and another replica may do better: it could not connect, dropped the request
    before answering, or answered 5xx. Not a timeout (another replica would get the same slow request) nor a
    redirect or a refusal of our credentials."""
    if isinstance(exc, UpstreamTimeout):
        return False
    status = exc.detail.get("upstream_status")
    return status is None or (isinstance(status, int) and status >= 500)
