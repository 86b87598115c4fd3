"""Cache-aware routing against least in flight and round robin, three replicas behind one model id.

Two parts, each running the three policies side by side in one run:

- ``conversations`` (the part that matters): three embedded replicas of the realistic model (``python -m
  genai_server``, ENGINE_THREADS=1 each, as the box has 2 cores), 12 conversations at once, 5 turns each; every
  conversation has its own ~500-token document, each turn sends the whole history back, and its user thinks 1-4 s
  (seeded) before the next. A turn is a cache hit
  when the replica reports cached prompt tokens. Per policy: the hit rate of turns 2-5, and the client's TTFT
  p50/p95 per turn. PREFIX_CACHE_CONVERSATIONS=8 on each replica, so that what is measured is where the gateway
  sends a turn, not how many conversations a replica may keep.
- ``skewed load``: three scripted upstreams (``scripted_upstream.py``: they compute nothing, send a token every few
  ms and serve SLOTS requests at a time, the rest waiting) stand in for replicas, so that the gateway's choice is
  all that differs, under two skews: ``slow replica`` (one replica takes 4x as long per token) and ``long
  requests`` (equal replicas, every fifth request asks for 8x the tokens). 12 clients each hold conversations of 5
  turns (so that cache_aware has conversations to follow) until 240 requests are done. Per policy: the requests
  each replica served and the client's e2e latency.

Writes ``docs/benchmarks/replica-balance.{json,md}``.

    python benchmarks/replica_balance.py [--part conversations|skewed|both] [--requests 240] [--concurrency 12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from bench_models import REALISTIC, ensure_model
from chat_turns import QUESTIONS, turn
from server_process import REPO, free_port, start, wait_ready

SCRIPT = REPO / "benchmarks" / "scripted_upstream.py"
POLICIES = ("least_in_flight", "round_robin", "cache_aware")
# Skewed load: scripted replicas.
FAST_S, SLOW_S = 0.002, 0.008  # seconds per token
TOKENS, LONG_TOKENS = 32, 256
SLOTS = 3  # requests a replica serves at once; 12 clients on 3 replicas queue at them
CASES = {"slow replica": (FAST_S, FAST_S, SLOW_S), "long requests": (FAST_S, FAST_S, FAST_S)}
# Conversations: embedded replicas.
CONVERSATIONS, TURNS, REPLY_TOKENS = 12, 5, 24
KEPT_CONVERSATIONS = 8  # each embedded replica's PREFIX_CACHE_CONVERSATIONS (ENGINE_THREADS=1 each)
# Seconds a user takes between an answer and the next question. Without it, a conversation in lockstep with the
# others finds its own replica the least busy the moment its answer ends, and least in flight looks cache-aware.
THINK_S = (1.0, 4.0)


def _models_file(folder: str, urls: list[str], policy: str) -> Path:
    models = Path(folder) / "models.toml"
    listed = ", ".join(f'"{url}"' for url in urls)
    models.write_text(
        f'[[models]]\nid = "balanced"\nbackend = "openai"\nupstream_model = "upstream"\n'
        f'urls = [{listed}]\nbalance = "{policy}"\n'
    )
    return models


@asynccontextmanager
async def gateway(session: aiohttp.ClientSession, urls: list[str], policy: str) -> AsyncIterator[str]:
    """A gateway in front of ``urls`` picking by ``policy``, once every replica has passed a health probe."""
    with tempfile.TemporaryDirectory() as folder:
        proc, url = start("--models-file", str(_models_file(folder, urls, policy)), "--max-concurrent-requests", "64")
        try:
            await wait_ready(session, url, proc)
            await asyncio.sleep(2.5)  # a health-probe round: every replica admitted
            yield url
        finally:
            proc.terminate()
            proc.wait()


def per_replica(metrics: str, urls: list[str], family: str = "requests") -> list[int]:
    counts = []
    for url in urls:
        line = next(
            line
            for line in metrics.splitlines()
            if line.startswith(f"genai_server_upstream_replica_{family}_total{{") and f'replica="{url}"' in line
        )
        counts.append(int(float(line.rsplit(" ", 1)[1])))
    return counts


# ---- conversations on embedded replicas ----------------------------------------------------------------------


def document(conversation: int, run: str) -> str:
    """~500 tokens of the realistic model's tokenizer, its own for each conversation of each run."""
    return f"Document {run}-{conversation}. " + " ".join(
        [f"the river number {conversation} runs past the old city of {run} at night and the light is green"] * 28
    )


async def converse(session: aiohttp.ClientSession, url: str, conversation: int, run: str) -> list[dict[str, Any]]:
    """One conversation's turns, each after its user's think time (the same seeded times for every policy)."""
    thinking = random.Random(conversation)
    messages = [{"role": "system", "content": document(conversation, run)}]
    results = []
    for number, question in enumerate(QUESTIONS[:TURNS]):
        if number:
            await asyncio.sleep(thinking.uniform(*THINK_S))  # a person reads the answer and types the next question
        messages.append({"role": "user", "content": question})
        result = await turn(session, url, "balanced", messages, REPLY_TOKENS)
        messages.append({"role": "assistant", "content": result.pop("text")})
        results.append(result)
    return results


@asynccontextmanager
async def embedded_replicas(session: aiohttp.ClientSession, model: Path) -> AsyncIterator[list[str]]:
    started = [
        start(
            output=subprocess.DEVNULL,
            MODEL_PATH=str(model),
            MODEL_ID="upstream",
            ENGINE_THREADS="1",
            PREFIX_CACHE_CONVERSATIONS=str(KEPT_CONVERSATIONS),
        )
        for _ in range(3)
    ]
    try:
        for proc, url in started:
            await wait_ready(session, url, proc)
        yield [f"{url}/v1" for _, url in started]
    finally:
        for proc, _ in started:
            proc.terminate()
            proc.wait()


async def conversations(policy: str) -> dict[str, Any]:
    """12 conversations at once through a gateway picking by ``policy``, on three fresh embedded replicas."""
    ensure_model(REALISTIC)
    timeout = aiohttp.ClientTimeout(total=None)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        embedded_replicas(session, REALISTIC.path) as urls,
        gateway(session, urls, policy) as url,
    ):
        started = time.perf_counter()
        runs = await asyncio.gather(*(converse(session, url, i, policy) for i in range(CONVERSATIONS)))
        wall = time.perf_counter() - started
        async with session.get(f"{url}/metrics") as resp:
            metrics = await resp.text()
    later = [r for run in runs for r in run[1:]]
    by_turn = []
    for t in range(TURNS):
        ttfts = sorted(run[t]["ttft_ms"] for run in runs)
        by_turn.append({"p50_ms": round(statistics.median(ttfts), 1), "p95_ms": round(_p95(ttfts), 1)})
    return {
        "hits": sum(1 for r in later if r["cached_tokens"] > 0),
        "later_turns": len(later),
        "ttft_by_turn": by_turn,
        "requests_per_replica": per_replica(metrics, urls),
        "prefix_hits_per_replica": per_replica(metrics, urls, "prefix_hits"),
        "wall_s": round(wall, 1),
    }


# ---- skewed load on scripted replicas ------------------------------------------------------------------------


def upstreams(paces: tuple[float, ...]) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    procs, urls = [], []
    for pace in paces:
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), str(port), str(pace), str(SLOTS)]))
        urls.append(f"http://127.0.0.1:{port}/v1")
    return procs, urls


async def load(session: aiohttp.ClientSession, url: str, case: str, requests: int, concurrency: int) -> list[float]:
    """``requests`` streamed chat turns from ``concurrency`` clients, each holding conversations of TURNS turns;
    the e2e latency of each, in ms."""
    latencies: list[float] = []
    numbers = iter(range(requests))

    async def client(who: int) -> None:
        messages: list[dict[str, str]] = []
        for n in numbers:
            if len(messages) >= 2 * TURNS + 1 or not messages:  # a new conversation, its own opening
                messages = [{"role": "system", "content": f"Conversation {who}-{n}: " + "be helpful. " * 40}]
            messages.append({"role": "user", "content": f"question {n}"})
            tokens = LONG_TOKENS if case == "long requests" and n % 5 == 0 else TOKENS
            body = {"model": "balanced", "messages": messages, "max_tokens": tokens, "stream": True}
            started = time.perf_counter()
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            latencies.append((time.perf_counter() - started) * 1000)
            messages.append({"role": "assistant", "content": "an answer"})

    await asyncio.gather(*[client(who) for who in range(concurrency)])
    return latencies


async def skewed(case: str, policy: str, requests: int, concurrency: int) -> dict[str, Any]:
    procs, urls = upstreams(CASES[case])
    try:
        async with aiohttp.ClientSession() as session, gateway(session, urls, policy) as url:
            started = time.perf_counter()
            latencies = sorted(await load(session, url, case, requests, concurrency))
            wall = time.perf_counter() - started
            async with session.get(f"{url}/metrics") as resp:
                served = per_replica(await resp.text(), urls)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    return {
        "requests_per_replica": served,
        "e2e_p50_ms": round(statistics.median(latencies), 1),
        "e2e_p95_ms": round(_p95(latencies), 1),
        "e2e_max_ms": round(latencies[-1], 1),
        "requests_per_s": round(requests / wall, 1),
    }


def _p95(ordered: list[float]) -> float:
    return ordered[int(0.95 * (len(ordered) - 1))]


# ---- the report ----------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Replica routing: cache-aware, least in flight, round robin", ""]
    if "conversations" in report:
        lines += [
            f"## {CONVERSATIONS} conversations at once, {TURNS} turns, three embedded replicas",
            "",
            f"Realistic model, ENGINE_THREADS=1 and PREFIX_CACHE_CONVERSATIONS=8 per replica, replies of "
            f"{REPLY_TOKENS} tokens; a hit is a turn whose replica reported cached prompt tokens. TTFT as the "
            "client saw it, p50 / p95 in ms. `python benchmarks/replica_balance.py --part conversations`",
            "",
            "| policy | hits, turns 2-5 | " + " | ".join(f"turn {t + 1}" for t in range(TURNS)) + " | wall |",
            "| --- | --- | " + " | ".join("---" for _ in range(TURNS)) + " | --- |",
        ]
        for policy, r in report["conversations"].items():
            turns = " | ".join(f"{t['p50_ms']:.0f} / {t['p95_ms']:.0f}" for t in r["ttft_by_turn"])
            rate = f"{r['hits']}/{r['later_turns']} ({100 * r['hits'] / r['later_turns']:.0f} %)"
            lines.append(f"| {policy} | {rate} | {turns} | {r['wall_s']} s |")
        lines.append("")
    if "skewed" in report:
        lines += [
            "## Skewed load, three scripted replicas",
            "",
            f"{FAST_S * 1000:g} ms/token (the slow one {SLOW_S * 1000:g} ms/token), each serving {SLOTS} requests at "
            f"a time; {report['requests']} streamed chat turns from {report['concurrency']} clients, conversations "
            f"of {TURNS} turns, {TOKENS} tokens (long requests: every fifth asks for {LONG_TOKENS}). Replica 3 is the "
            "slow one where there is one. `python benchmarks/replica_balance.py --part skewed`",
            "",
            "| case | policy | requests per replica | e2e p50 | e2e p95 | e2e max | requests/s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for case, policies in report["skewed"].items():
            for policy, r in policies.items():
                served = " / ".join(str(n) for n in r["requests_per_replica"])
                lines.append(
                    f"| {case} | {policy} | {served} | {r['e2e_p50_ms']} ms | {r['e2e_p95_ms']} ms "
                    f"| {r['e2e_max_ms']} ms | {r['requests_per_s']} |"
                )
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"requests": args.requests, "concurrency": args.concurrency}
    if args.part in ("conversations", "both"):
        report["conversations"] = {}
        for policy in POLICIES:
            report["conversations"][policy] = await conversations(policy)
            print("conversations", policy, report["conversations"][policy], flush=True)
    if args.part in ("skewed", "both"):
        report["skewed"] = {}
        for case in CASES:
            report["skewed"][case] = {}
            for policy in POLICIES:
                report["skewed"][case][policy] = await skewed(case, policy, args.requests, args.concurrency)
                print(case, policy, report["skewed"][case][policy], flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("conversations", "skewed", "both"), default="both")
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
