"""A small streaming load driver: what each request saw, timed at the client.

Why not an existing load generator: aiperf, guidellm and genai-perf need a
Hugging Face tokenizer loaded through transformers (or the hub) and report their
own summary only, while this benchmark must also time a bare in-process baseline,
the server's event loop and /health in the same run. The server's own usage chunk
gives exact token counts, so the client needs no tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class StreamResult:
    """One streamed request as the client saw it."""

    ttft_s: float
    e2e_s: float
    tokens: int
    chunk_times: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first: (e2e - TTFT) / (n - 1)."""
        return (self.e2e_s - self.ttft_s) / max(self.tokens - 1, 1)


async def stream_completion(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int
) -> StreamResult:
    """POST a streaming /v1/completions request and time it."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, tokens, times = None, 0, []
    async with session.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            # Byte checks, not a JSON parse per chunk: the client shares the CPU with the server it times.
            if not raw.startswith(b"data: {"):
                continue
            if b'"usage"' in raw:
                tokens = json.loads(raw[6:])["usage"]["completion_tokens"]
            elif b'"text":""' not in raw:
                now = time.perf_counter()
                ttft = ttft if ttft is not None else now - start
                times.append(now)
    e2e = time.perf_counter() - start
    return StreamResult(ttft if ttft is not None else e2e, e2e, tokens, times)


@dataclass
class LevelResult:
    """Every request of one concurrency level, and the wall time of the level."""

    concurrency: int
    wall_s: float
    requests: list[StreamResult]

    @property
    def tokens_per_s(self) -> float:
        """Aggregate output tokens per second across all streams."""
        return sum(r.tokens for r in self.requests) / self.wall_s

    def summary(self) -> dict[str, float]:
        """TTFT and TPOT percentiles (ms) and throughput."""
        ttft = sorted(r.ttft_s * 1000 for r in self.requests)
        tpot = sorted(r.tpot_s * 1000 for r in self.requests)
        return {
            "concurrency": self.concurrency,
            "tokens_per_s": self.tokens_per_s,
            "ttft_p50_ms": pct(ttft, 0.5),
            "ttft_p95_ms": pct(ttft, 0.95),
            "tpot_p50_ms": pct(tpot, 0.5),
            "tpot_p95_ms": pct(tpot, 0.95),
            "requests": len(self.requests),
            "tokens": sum(r.tokens for r in self.requests),
        }


async def run_level(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    concurrency: int,
    per_worker: int,
) -> LevelResult:
    """``concurrency`` workers, each sending ``per_worker`` streaming requests back to back."""

    async def worker() -> list[StreamResult]:
        return [await stream_completion(session, url, model, prompt, max_tokens) for _ in range(per_worker)]

    start = time.perf_counter()
    results = await asyncio.gather(*[worker() for _ in range(concurrency)])
    return LevelResult(concurrency, time.perf_counter() - start, [r for rs in results for r in rs])


async def poll_health(
    session: aiohttp.ClientSession, url: str, stop: asyncio.Event, interval_s: float = 0.02
) -> list[float]:
    """GET /health every ``interval_s`` until ``stop``; returns the latencies in ms."""
    latencies = []
    while not stop.is_set():
        start = time.perf_counter()
        async with session.get(url + "/health") as resp:
            await resp.read()
        latencies.append((time.perf_counter() - start) * 1000)
        await asyncio.sleep(interval_s)
    return latencies


def pct(sorted_values: list[float], q: float) -> float:
    """The q-quantile of already sorted values (nearest rank)."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def median(values: list[float]) -> float:
    """The median, or NaN for none."""
    return statistics.median(values) if values else float("nan")
