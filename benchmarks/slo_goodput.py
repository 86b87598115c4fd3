"""Goodput under twice the load the server can take, with and without admission by TTFT objective (SLO_ADMISSION).

One embedded server on the realistic model, once with SLO_ADMISSION=true and once with false (a fresh server each).
First the server's pace: the TTFT of one request alone (the median of five), and its capacity, requests per second
with 8 clients sending back to back (the first server's figures set the run; both servers are warmed alike). The
objective is 4x that lone TTFT, sent with every request as its ``x-slo-ttft-ms`` header (as inference-perf sends
it). Then requests arrive at random (Poisson, the same seeded arrivals) at twice the capacity for DURATION_S seconds;
the queue is long enough to take every one of them, as a server that lets work wait would. Each prompt starts with a
number of its own, so that no prefix is reused.

Per run: requests sent, refused at once (429 ``slo_unattainable``), served, and served within the objective; goodput
(requests within the objective per second of the run, the last answer included); TTFT p50/p95 of those served, as the
client saw it.

    python benchmarks/slo_goodput.py [--duration 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
from bench_models import REALISTIC, ensure_model
from server_process import REPO, start, wait_ready

REPLY_TOKENS = 16
SEED = 24
# Long enough to take everything a run sends: without admission, every request waits its turn.
QUEUED, QUEUE_TIMEOUT_S = "4096", "3600"


def prompt(number: int) -> str:
    """~80 tokens, starting with a number of its own."""
    return f"Request {number}. " + "Tell me about the old city by the river, its bridges and its lights. " * 5


async def ask(
    session: aiohttp.ClientSession, url: str, number: int, objective_ms: float | None = None
) -> dict[str, Any]:
    """One streamed chat request (with ``objective_ms`` as its x-slo-ttft-ms): its status and the TTFT the client
    saw (ms)."""
    headers = {"x-slo-ttft-ms": str(objective_ms)} if objective_ms is not None else {}
    body = {
        "model": "served",
        "messages": [{"role": "user", "content": prompt(number)}],
        "max_tokens": REPLY_TOKENS,
        "stream": True,
    }
    started = time.perf_counter()
    ttft = None
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
        async for line in resp.content:
            if ttft is None and resp.status == 200 and line.startswith(b"data: {"):
                ttft = (time.perf_counter() - started) * 1000
    return {"status": resp.status, "ttft_ms": ttft, "done": time.perf_counter()}


async def pace(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """The TTFT of a request alone (ms, median of five) and the capacity (requests/s, 8 clients back to back)."""
    alone = [(await ask(session, url, n))["ttft_ms"] or 0.0 for n in range(5)]
    numbers = iter(range(1000, 1032))

    async def client() -> None:
        for n in numbers:
            await ask(session, url, n)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(8)))
    return statistics.median(alone), 32 / (time.perf_counter() - started)


async def overload(url: str, rate: float, duration_s: float, objective_ms: float) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` per second for ``duration_s``; what came of them."""
    arrivals = random.Random(SEED)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        tasks: list[asyncio.Task[dict[str, Any]]] = []
        at = 0.0
        while at < duration_s:
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            tasks.append(asyncio.create_task(ask(session, url, 10_000 + len(tasks), objective_ms)))
            at += arrivals.expovariate(rate)
        results = await asyncio.gather(*tasks)
    served = [r for r in results if r["status"] == 200]
    good = [r for r in served if r["ttft_ms"] is not None and r["ttft_ms"] <= objective_ms]
    ttfts = sorted(r["ttft_ms"] for r in served if r["ttft_ms"] is not None)
    span = max(r["done"] for r in results) - started
    return {
        "sent": len(results),
        "refused": sum(1 for r in results if r["status"] == 429),
        "served": len(served),
        "within_objective": len(good),
        "goodput_per_s": round(len(good) / span, 2),
        "span_s": round(span, 1),
        "ttft_p50_ms": round(statistics.median(ttfts), 0) if ttfts else None,
        "ttft_p95_ms": round(ttfts[int(0.95 * (len(ttfts) - 1))], 0) if ttfts else None,
    }


async def run(duration_s: float) -> dict[str, Any]:
    ensure_model(REALISTIC)
    report: dict[str, Any] = {"duration_s": duration_s, "runs": {}}
    for admission in ("true", "false"):
        # The objective is known once the first server's pace is: each request carries it as its x-slo-ttft-ms
        # header, as inference-perf sends it.
        proc, url = start(
            MODEL_PATH=str(REALISTIC.path),
            MODEL_ID="served",
            MAX_QUEUED_REQUESTS=QUEUED,
            QUEUE_TIMEOUT=QUEUE_TIMEOUT_S,
            SLO_ADMISSION=admission,
        )
        try:
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, url, proc)
                # Both servers are measured this way before the overload: a server that has run a while.
                alone_ms, capacity = await pace(session, url)
            if "objective_ms" not in report:
                report.update(alone_ttft_ms=round(alone_ms, 1), capacity_per_s=round(capacity, 2))
                report.update(objective_ms=round(4 * alone_ms), rate_per_s=round(2 * capacity, 2))
            result = await overload(url, report["rate_per_s"], duration_s, report["objective_ms"])
            report["runs"][f"SLO_ADMISSION={admission}"] = result
        finally:
            proc.terminate()
            proc.wait()
        print(admission, result, flush=True)
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Goodput under 2x overload, with and without admission by TTFT objective",
        "",
        f"Realistic model, one embedded server. Alone, a request's TTFT was {report['alone_ttft_ms']} ms; capacity "
        f"{report['capacity_per_s']} requests/s. Objective (x-slo-ttft-ms) {report['objective_ms']} ms (4x); Poisson "
        f"arrivals at {report['rate_per_s']} requests/s (2x capacity) for {report['duration_s']:g} s; replies of "
        f"{REPLY_TOKENS} tokens. `python benchmarks/slo_goodput.py`",
        "",
        "| run | sent | refused at once | served | within objective | goodput | TTFT p50 / p95 (served) | span |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in report["runs"].items():
        lines.append(
            f"| {name} | {r['sent']} | {r['refused']} | {r['served']} | {r['within_objective']} "
            f"| {r['goodput_per_s']}/s | {r['ttft_p50_ms']} / {r['ttft_p95_ms']} ms | {r['span_s']} s |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args()
    report = asyncio.run(run(args.duration))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "slo-goodput.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "slo-goodput.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
