"""The figures behind docs/reliability.md (issue 8), measured against a real server process started from a checkout.

    python benchmarks/reliability_figures.py liveness [--checkout DIR]
        /health/live latency while clients post 3.5 MB chat messages (refused from their length), then 3 KB
        ones (tokenised and generated): how long the event loop is held by big input.
    python benchmarks/reliability_figures.py memory [--checkout DIR] [SETTING=VALUE ...]
        peak RSS while 4 clients each ask for n=16 seeded sampled sequences of 2000 tokens on the bench model
        (python scripts/make_model.py bench), for at most 40 s.

``--checkout`` runs the server of another checkout (e.g. a ``git worktree`` of an older commit) with the same
client, so before and after are measured side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import subprocess
import time
from pathlib import Path

import aiohttp
from server_process import REPO, start, wait_ready

BENCH_MODEL = REPO / "models" / "bench-random-llama-int4"


async def _serve(checkout: Path, **settings: str) -> tuple[subprocess.Popen[bytes], str]:
    """The server of ``checkout`` (this one, or another for a before/after), silent, once it answers."""
    proc, url = start(cwd=checkout, output=subprocess.DEVNULL, **settings)
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, url, proc)
    return proc, url


async def _probe(session: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        async with session.get(f"{url}/health/live") as resp:
            await resp.read()
        latencies.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0.002)
    return latencies


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> int:
    async with session.post(
        f"{url}/v1/chat/completions", data=io.BytesIO(body), headers={"Content-Type": "application/json"}
    ) as resp:
        await resp.read()
        return resp.status


async def liveness(checkout: Path) -> None:
    """Big and ordinary messages in rounds, liveness polled meanwhile."""
    proc, url = await _serve(checkout, MAX_QUEUED_REQUESTS="64")
    try:
        async with aiohttp.ClientSession() as session:
            for name, text, per_round in (("3.5 MB message", "word " * 700_000, 4), ("3 KB message", "word " * 600, 8)):
                body = json.dumps(
                    {
                        "model": "tiny-random-llama-int4",
                        "max_tokens": 1,
                        "messages": [{"role": "user", "content": text}],
                    }
                ).encode()
                stop = asyncio.Event()
                probe = asyncio.create_task(_probe(session, url, stop))
                started = time.perf_counter()
                statuses = []
                for _ in range(10):
                    statuses += await asyncio.gather(*[_post(session, url, body) for _ in range(per_round)])
                took = time.perf_counter() - started
                stop.set()
                latencies = sorted(await probe)
                print(
                    f"{name} x{len(statuses)}: statuses {sorted(set(statuses))}, {took * 1000:.0f} ms; "
                    f"/health/live p50 {statistics.median(latencies):.2f} ms, max {latencies[-1]:.2f} ms "
                    f"over {len(latencies)} probes"
                )
    finally:
        proc.kill()
        proc.wait()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


async def memory(checkout: Path, settings: dict[str, str]) -> None:
    """64 seeded sequences asked for at once; RSS sampled every 100 ms."""
    proc, url = await _serve(checkout, MODEL_PATH=str(BENCH_MODEL), **settings)
    body = {
        "model": BENCH_MODEL.name,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "n": 16,
        "seed": 1,
        "temperature": 1.0,
        "max_tokens": 2000,
    }
    start = peak = _rss_mb(proc.pid)
    began = time.perf_counter()
    try:
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(session.post(f"{url}/v1/chat/completions", json=body)) for _ in range(4)]
            while time.perf_counter() - began < 40 and not all(task.done() for task in tasks):
                peak = max(peak, _rss_mb(proc.pid))
                await asyncio.sleep(0.1)
            done = sum(task.done() for task in tasks)
            for task in tasks:
                task.cancel()
    finally:
        proc.kill()
        proc.wait()
    print(
        f"{settings or 'default settings'}: RSS at start {start:.0f} MB, peak {peak:.0f} MB, {done}/4 requests "
        f"done after {time.perf_counter() - began:.1f} s"
    )


def main() -> None:
    """Parse the figure to measure and run it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=["liveness", "memory"])
    parser.add_argument("--checkout", type=Path, default=REPO, help="the checkout whose server to run")
    parser.add_argument("settings", nargs="*", help="SETTING=VALUE for the server (memory)")
    args = parser.parse_args()
    if args.figure == "liveness":
        asyncio.run(liveness(args.checkout))
    else:
        asyncio.run(memory(args.checkout, dict(item.split("=", 1) for item in args.settings)))


if __name__ == "__main__":
    main()
