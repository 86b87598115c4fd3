"""What the engine's process wall costs and what it buys, side by side in one run: the server with its engine in a
process of its own (the default) against the same server with the engine in its own process (ENGINE_PROCESS=false).

Both servers run at once on the same model and are measured in turns (the order alternates each round), so that
the machine's drift falls on both alike:

- one stream: decode tokens/s after the first token, and the time to the first token;
- four concurrent streams: aggregate tokens/s;
- a compile that holds the GIL: ``/health/live`` latency (median and slowest) while four requests with a JSON
  schema of 1000 properties each (the most the bounds allow) compile and generate.

    python benchmarks/engine_wall.py [--model PATH] [--tokens 256] [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import PROMPT, SMALL, ensure_model
from load import stream_completion
from server_process import start, wait_ready

MODES = {"wall": (), "in-process": ("--no-engine-process",)}
_PROPERTIES = 1000  # schema_bounds.py's limit: the heaviest schema a client may send


async def one_stream(session: aiohttp.ClientSession, url: str, model: str, tokens: int) -> tuple[float, float]:
    """Decode tokens/s after the first token, and the time to the first token (ms)."""
    result = await stream_completion(session, url, model, PROMPT, tokens)
    return (result.tokens - 1) / (result.e2e_s - result.ttft_s), result.ttft_s * 1000


async def four_streams(session: aiohttp.ClientSession, url: str, model: str, tokens: int) -> float:
    """Aggregate tokens/s of four streams started together."""
    started = time.perf_counter()
    results = await asyncio.gather(*[stream_completion(session, url, model, PROMPT, tokens) for _ in range(4)])
    return sum(r.tokens for r in results) / (time.perf_counter() - started)


async def liveness_during_compiles(session: aiohttp.ClientSession, url: str, model: str) -> list[float]:
    """``/health/live`` latencies (ms) while four requests with a 1000-property schema run."""
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(_PROPERTIES)}}
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Fill the form."}],
        "max_tokens": 16,
        "response_format": {"type": "json_schema", "json_schema": {"name": "form", "schema": schema}},
    }

    async def heavy() -> None:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            await resp.read()

    work = asyncio.gather(*[heavy() for _ in range(4)])
    latencies: list[float] = []
    while not work.done():
        started = time.perf_counter()
        async with session.get(url + "/health/live") as resp:
            await resp.read()
        latencies.append((time.perf_counter() - started) * 1000)
    await work
    return latencies


async def measure(model_path: Path, tokens: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    servers = {
        mode: start("--model-path", str(model_path), "--max-concurrent-requests", "64", *extra)
        for mode, extra in MODES.items()
    }
    figures: dict[str, dict[str, list[float]]] = {mode: {} for mode in MODES}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            for proc, url in servers.values():
                await wait_ready(session, url, proc)
            model = model_path.name
            for _, url in servers.values():  # warm-up
                await stream_completion(session, url, model, PROMPT, 32)
            for turn in range(rounds):
                order = list(servers.items()) if turn % 2 == 0 else list(servers.items())[::-1]
                for mode, (_, url) in order:
                    rate, ttft = await one_stream(session, url, model, tokens)
                    got = figures[mode]
                    got.setdefault("tokens_per_s_1", []).append(rate)
                    got.setdefault("ttft_ms_1", []).append(ttft)
                    got.setdefault("tokens_per_s_4", []).append(await four_streams(session, url, model, tokens))
            for mode, (_, url) in servers.items():
                figures[mode]["live_ms"] = await liveness_during_compiles(session, url, model)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
    return figures


def report(figures: dict[str, dict[str, Any]]) -> None:
    """Medians of each, and the ratio of each round's pair (median and quartiles: the noise shows beside it)."""
    wall, inproc = figures["wall"], figures["in-process"]
    print(f"{'figure':28s} {'wall':>10s} {'in-process':>12s} {'wall / in-process, per round':>30s}")
    for name in ("tokens_per_s_1", "ttft_ms_1", "tokens_per_s_4"):
        a, b = statistics.median(wall[name]), statistics.median(inproc[name])
        pairs = [x / y for x, y in zip(wall[name], inproc[name], strict=True)]
        low, mid, high = statistics.quantiles(pairs, n=4)
        print(f"{name + ' (median)':28s} {a:10.1f} {b:12.1f} {mid:14.3f} [{low:.3f}-{high:.3f}]")
    for label, pick in (("median", statistics.median), ("slowest", max)):
        a, b = pick(wall["live_ms"]), pick(inproc["live_ms"])
        print(f"{'/health/live ms, ' + label:28s} {a:10.1f} {b:12.1f} {a / b:14.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model folder (default: the small benchmark model, built)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if args.model is None:
        ensure_model(SMALL)
    report(asyncio.run(measure(args.model or SMALL.path, args.tokens, args.rounds)))


if __name__ == "__main__":
    main()
