"""Several replicas of one upstream engine behind one model id: which one takes a request, and which are healthy.

By default (``cache_aware``) a request that continues a conversation goes to the replica that served its earlier
turns, which holds their KV cache (``affinity.py``), unless that replica is overloaded: more in flight than
``load_factor`` times the mean, counting this request, and more than two (consistent hashing with bounded loads,
Mirrokni et al.). A Responses request that continues a response (``previous_response_id``) goes to the replica
that wrote it, loaded or not: that replica alone keeps the response.

Every other request goes to the healthy replica with the fewest requests in flight from this gateway (ties broken
at random): ``least_in_flight`` does that for every request, ``round_robin`` takes them in turn (both kept to
compare against). Replicas a request already tried are passed over.

A replica is ejected when its health probe fails or a request cannot connect to it, and re-admitted when its probe
answers again. With every candidate ejected, requests still go to the least busy one: a stale health state must
not turn a brief failure into a certain one. Whether a failed request goes to another replica is not decided here
but in the relay loop (``relay.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from genai_server.backends.affinity import Prefixes, PrefixTable, response_key
from genai_server.backends.upstream_client import TrackedResponse, UpstreamClient
from genai_server.errors import UpstreamError, UpstreamUnavailable
from genai_server.shown_urls import shown_url
from genai_server.telemetry.load import ReplicaLoad

log = logging.getLogger(__name__)

Balance = Literal["cache_aware", "least_in_flight", "round_robin"]
# A replica holding a conversation takes its next turn while it has at most this times the mean in flight, or at
# most LEAST_BOUND requests whatever the mean.
LOAD_FACTOR = 1.25
LEAST_BOUND = 2
# How often every replica's health probe runs while the gateway serves.
HEALTH_INTERVAL_S = 2.0


@dataclass(eq=False)  # compared by identity: two replicas may share an address
class Replica:
    """One upstream address and what the gateway knows of it."""

    client: UpstreamClient
    name: str  # its URL without credentials: a metrics label and a log field
    in_flight: int = 0
    healthy: bool = True
    requests: int = 0
    errors: int = 0
    prefix_hits: int = 0  # requests sent here because it served their conversation's prefix
    prefix_passed_over: int = 0  # requests it served the prefix of, sent elsewhere because it was overloaded
    probed: bool = field(default=False, repr=False)

    def load(self) -> ReplicaLoad:
        """What the per-replica series show of it now."""
        return ReplicaLoad(
            name=self.name,
            in_flight=self.in_flight,
            healthy=self.healthy,
            requests=self.requests,
            errors=self.errors,
            prefix_hits=self.prefix_hits,
            prefix_passed_over=self.prefix_passed_over,
        )


class ReplicaSet:
    """The replicas of one upstream: ``pick`` chooses one, ``post`` sends to it and counts what it has in flight,
    ``failed`` counts a failure against it. Nothing here retries."""

    def __init__(
        self, clients: list[UpstreamClient], balance: Balance = "cache_aware", load_factor: float = LOAD_FACTOR
    ) -> None:
        self.replicas = [Replica(client, shown_url(client.base_url)) for client in clients]
        self._balance = balance
        self._load_factor = load_factor
        self._turn = itertools.count()
        self._holders: PrefixTable[Replica] = PrefixTable()
        self._health: asyncio.Task[None] | None = None

    @property
    def follows_prefixes(self) -> bool:
        """Whether ``pick`` wants a request's prefixes: the balance is ``cache_aware`` and there is a choice."""
        return self._balance == "cache_aware" and len(self.replicas) > 1

    async def start(self) -> None:
        """Open every replica's session; with several, start probing their health."""
        for replica in self.replicas:
            await replica.client.start()
        if len(self.replicas) > 1:  # one replica alone is probed when readiness is asked
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
        if len(self.replicas) == 1:
            replica = self.replicas[0]
            self._update(replica, await replica.client.ready())
        elif not any(replica.probed for replica in self.replicas):
            await self._probe_all()
        return any(replica.healthy for replica in self.replicas)

    def load(self) -> tuple[ReplicaLoad, ...]:
        """Every replica's figures now (for the per-replica series)."""
        return tuple(replica.load() for replica in self.replicas)

    def pick(self, tried: Collection[Replica] = (), prefixes: Prefixes | None = None) -> Replica:
        """The replica to take a request: one not in ``tried`` while any is left, healthy if one is; then the one
        that served the conversation ``prefixes`` continue while it is not overloaded, else the least busy (or the
        next in turn)."""
        candidates = [r for r in self.replicas if r not in tried] or self.replicas
        healthy = [r for r in candidates if r.healthy] or candidates
        if self._balance == "round_robin":
            return healthy[next(self._turn) % len(healthy)]
        if prefixes is None or not self.follows_prefixes:
            return _least_busy(healthy)
        chosen = self._writer(healthy, prefixes) or self._warm(healthy, prefixes) or _least_busy(healthy)
        self._holders.remember(prefixes, chosen)
        return chosen

    def remember_response(self, response_id: str, replica_name: str | None) -> None:
        """The replica named ``replica_name`` wrote (and keeps) the response ``response_id``: a request continuing
        it (previous_response_id), and its GET or DELETE, go there."""
        if not self.follows_prefixes:
            return
        replica = next((r for r in self.replicas if r.name == replica_name), None)
        if replica is not None:
            self._holders.remember_key(response_key(response_id), replica)

    def _writer(self, healthy: list[Replica], prefixes: Prefixes) -> Replica | None:
        """The replica among ``healthy`` that wrote the response ``prefixes`` continue."""
        writer = self._holders.writer(prefixes)
        if writer is None or writer not in healthy:
            return None
        writer.prefix_hits += 1
        return writer

    def _warm(self, healthy: list[Replica], prefixes: Prefixes) -> Replica | None:
        """The replica among ``healthy`` that served the longest of ``prefixes``, unless it is overloaded."""
        holder = self._holders.holder(prefixes)
        if holder is None or holder not in healthy:
            return None
        # Bounded load: at most load_factor times the mean in flight, this request counted, rounded up; and a
        # replica may always have LEAST_BOUND requests (at low load, ceil(1.25 x 2 / 3) = 1 would send a
        # conversation away from its cache while its replica serves a single other request).
        mean = (sum(r.in_flight for r in healthy) + 1) / len(healthy)
        bound = max(math.ceil(self._load_factor * mean), LEAST_BOUND)
        if holder.in_flight + 1 > bound:
            holder.prefix_passed_over += 1
            return None
        holder.prefix_hits += 1
        return holder

    async def post(
        self,
        replica: Replica,
        path: str,
        body: dict[str, Any] | None,
        *,
        at_root: bool = False,
        method: str = "POST",
    ) -> aiohttp.ClientResponse:
        """POST (or ``method``) to ``replica``, counted as in flight until its response closes (or the post fails)."""
        replica.in_flight += 1
        replica.requests += 1
        try:
            response = await replica.client.post(path, body, at_root=at_root, method=method)
        except BaseException:
            replica.in_flight -= 1
            raise
        if isinstance(response, TrackedResponse):
            response.on_close = lambda: _release(replica)
        else:  # pragma: no cover - every session of ours makes TrackedResponses
            _release(replica)
        return response

    def failed(self, replica: Replica, exc: UpstreamError) -> None:
        """A request failed on ``replica`` before any of it reached the client: counted against it, and a replica
        that cannot be reached is ejected until its probe answers (one replica alone stays: there is no other)."""
        replica.errors += 1
        if isinstance(exc, UpstreamUnavailable) and len(self.replicas) > 1:
            self._eject(replica, exc.detail.get("cause", exc.message))

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


def _least_busy(replicas: list[Replica]) -> Replica:
    fewest = min(r.in_flight for r in replicas)
    return random.choice([r for r in replicas if r.in_flight == fewest])


def _release(replica: Replica) -> None:
    replica.in_flight -= 1
