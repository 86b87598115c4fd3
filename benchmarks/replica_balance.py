"""Least in flight against round robin, with three replicas behind one model id, under skewed load.

Three scripted upstreams (``scripted_upstream.py``, which compute nothing, send one token every few ms and serve
SLOTS requests at a time, the rest waiting, as an engine's batch limit makes them) stand in for engine replicas, so
the gateway's choice is all that differs. Two kinds of skew, each run with both policies
side by side in one run:

- ``slow replica``: one replica takes 4x as long per token as the other two (a busier or smaller box);
- ``long requests``: equal replicas, but every fifth request asks for 8x the tokens.

It prints, per case and policy, the requests each replica served and the client's end-to-end latency (p50, p95, max),
and writes ``docs/benchmarks/replica-balance.{json,md}``.

    python benchmarks/replica_balance.py [--requests 240] [--concurrency 12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from server_process import REPO, free_port, start, wait_ready

SCRIPT = REPO / "benchmarks" / "scripted_upstream.py"
FAST_S, SLOW_S = 0.002, 0.008  # seconds per token
TOKENS, LONG_TOKENS = 32, 256
SLOTS = 3  # requests a replica serves at once; 12 clients on 3 replicas queue at them
CASES = {"slow replica": (FAST_S, FAST_S, SLOW_S), "long requests": (FAST_S, FAST_S, FAST_S)}
POLICIES = ("least_in_flight", "round_robin")


def upstreams(paces: tuple[float, ...]) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    procs, urls = [], []
    for pace in paces:
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), str(port), str(pace), str(SLOTS)]))
        urls.append(f"http://127.0.0.1:{port}/v1")
    return procs, urls


async def load(session: aiohttp.ClientSession, url: str, case: str, requests: int, concurrency: int) -> list[float]:
    """``requests`` streamed completions from ``concurrency`` clients; the e2e latency of each, in ms."""
    latencies: list[float] = []
    numbers = iter(range(requests))

    async def client() -> None:
        for n in numbers:
            tokens = LONG_TOKENS if case == "long requests" and n % 5 == 0 else TOKENS
            body = {"model": "balanced", "prompt": "x", "max_tokens": tokens, "stream": True}
            started = time.perf_counter()
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*[client() for _ in range(concurrency)])
    return latencies


def per_replica(metrics: str, urls: list[str]) -> list[int]:
    served = []
    for url in urls:
        line = next(
            line
            for line in metrics.splitlines()
            if line.startswith("genai_server_upstream_replica_requests_total{") and f'replica="{url}"' in line
        )
        served.append(int(float(line.rsplit(" ", 1)[1])))
    return served


async def measure(case: str, policy: str, requests: int, concurrency: int) -> dict[str, Any]:
    procs, urls = upstreams(CASES[case])
    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder) / "models.toml"
        listed = ", ".join(f'"{url}"' for url in urls)
        models.write_text(
            f'[[models]]\nid = "balanced"\nbackend = "openai"\nupstream_model = "scripted"\n'
            f'urls = [{listed}]\nbalance = "{policy}"\n'
        )
        gateway, url = start("--models-file", str(models), "--max-concurrent-requests", "64")
        try:
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, url)
                await asyncio.sleep(2.5)  # a health-probe round: every replica admitted
                started = time.perf_counter()
                latencies = sorted(await load(session, url, case, requests, concurrency))
                wall = time.perf_counter() - started
                async with session.get(f"{url}/metrics") as resp:
                    served = per_replica(await resp.text(), urls)
        finally:
            for proc in (gateway, *procs):
                proc.terminate()
                proc.wait()
    return {
        "requests_per_replica": served,
        "e2e_p50_ms": round(statistics.median(latencies), 1),
        "e2e_p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))], 1),
        "e2e_max_ms": round(latencies[-1], 1),
        "requests_per_s": round(requests / wall, 1),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Replica balancing under skewed load",
        "",
        f"3 scripted replicas ({FAST_S * 1000:g} ms/token; the slow one {SLOW_S * 1000:g} ms/token), "
        f"each serving {SLOTS} requests at a time; {report['requests']} streamed requests from "
        f"{report['concurrency']} clients, {TOKENS} tokens (long requests: every fifth asks for {LONG_TOKENS}). "
        "Replica 3 is the slow one where there is one. `python benchmarks/replica_balance.py`",
        "",
        "| case | policy | requests per replica | e2e p50 | e2e p95 | e2e max | requests/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, policies in report["cases"].items():
        for policy, r in policies.items():
            served = " / ".join(str(n) for n in r["requests_per_replica"])
            lines.append(
                f"| {case} | {policy} | {served} | {r['e2e_p50_ms']} ms | {r['e2e_p95_ms']} ms "
                f"| {r['e2e_max_ms']} ms | {r['requests_per_s']} |"
            )
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"requests": args.requests, "concurrency": args.concurrency, "cases": {}}
    for case in CASES:
        report["cases"][case] = {}
        for policy in POLICIES:
            report["cases"][case][policy] = await measure(case, policy, args.requests, args.concurrency)
            print(case, policy, report["cases"][case][policy], flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replica-balance.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "replica-balance.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
