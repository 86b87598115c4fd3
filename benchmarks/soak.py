"""Soak: mixed load against a live server for a set time, then what happened to every request.

Workers loop over a weighted mix: streamed and JSON completions, clients that leave mid-stream, bad input
(expected 4xx), and bursts beyond the concurrency limit and queue (expected 429s). Any 5xx, wrong status,
broken stream or exception is "unexpected"; a request that takes longer than --hang-s is "hung". The server's
resident memory is read at the start, every minute and at the end.

    python benchmarks/soak.py --minutes 10            # starts a server on the small benchmark model
    python benchmarks/soak.py --url http://127.0.0.1:8000 --model ID --pid PID --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import SMALL, ensure_model
from server_process import memory_mb, start, wait_ready

BAD_BODIES: list[Any] = [
    {"messages": []},
    {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
    {"model": None},
    [1, 2],
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"prompt": "x", "temperature": 9},
    {"prompt": "x", "max_tokens": -1},
]


class Soak:
    """The load, the tally and the memory readings."""

    def __init__(self, url: str, model: str, hang_s: float) -> None:
        self.url, self.model, self.hang_s = url, model, hang_s
        self.outcomes: Counter[str] = Counter()
        self.unexpected: list[str] = []

    def _note(self, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if outcome in ("unexpected", "hung") and len(self.unexpected) < 50:
            self.unexpected.append(f"{outcome}: {detail[:200]}")

    async def one(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        kind = rng.choices(["stream", "json", "cancel", "bad", "chat"], [4, 3, 2, 2, 2])[0]
        try:
            async with asyncio.timeout(self.hang_s):
                await getattr(self, f"_{kind}")(session, rng)
        except TimeoutError:
            self._note("hung", kind)
        except (aiohttp.ClientError, ValueError, KeyError) as exc:
            self._note("unexpected", f"{kind}: {exc!r}")

    def _body(self, rng: random.Random, **extra: Any) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": rng.choice(["Once upon a time", "Hello", "The server"]),
            "max_tokens": rng.randint(4, 96),
            "temperature": rng.choice([0, 0.8]),
            **extra,
        }

    async def _stream(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        async with session.post(self.url + "/v1/completions", json=self._body(rng, stream=True)) as resp:
            text = await resp.text()
        if resp.status == 429:
            self._note("rate_limited_429")
        elif resp.status != 200 or not text.endswith("data: [DONE]\n\n") or '"error"' in text:
            self._note("unexpected", f"stream {resp.status} {text[-200:]}")
        else:
            self._note("ok_stream")

    async def _json(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        async with session.post(self.url + "/v1/completions", json=self._body(rng)) as resp:
            body = await resp.json()
        if resp.status == 429:
            self._note("rate_limited_429")
        elif resp.status != 200 or not body["choices"]:
            self._note("unexpected", f"json {resp.status} {body}")
        else:
            self._note("ok_json")

    async def _chat(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 16,
            "n": rng.randint(1, 3),
            "stop": ["\n"],
        }
        async with session.post(self.url + "/v1/chat/completions", json=body) as resp:
            payload = await resp.json()
        ok = resp.status == 200 and len(payload["choices"]) == body["n"]
        self._note(
            "ok_json" if ok else "rate_limited_429" if resp.status == 429 else "unexpected",
            f"chat {resp.status} {payload}",
        )

    async def _cancel(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        body = self._body(rng, stream=True, max_tokens=1000, prompt="Tell me a long story")
        async with session.post(self.url + "/v1/completions", json=body) as resp:
            if resp.status == 429:
                self._note("rate_limited_429")
                return
            await resp.content.readline()
            resp.close()  # the client leaves mid-stream
        self._note("cancelled_by_client")

    async def _bad(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        async with session.post(self.url + path, json=rng.choice(BAD_BODIES)) as resp:
            payload = await resp.json()
        ok = 400 <= resp.status < 500 and isinstance(payload.get("error", {}).get("code"), str)
        self._note("bad_input_4xx" if ok else "unexpected", f"bad {resp.status} {payload}")

    async def burst(self, session: aiohttp.ClientSession, rng: random.Random, size: int) -> None:
        """Far more at once than slots + queue: the excess must be 429s, nothing else."""
        await asyncio.gather(*[self._json(session, rng) for _ in range(size)])


async def worker(soak: Soak, session: aiohttp.ClientSession, seed: int, until: float) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        await soak.one(session, rng)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    proc = None
    url, model, pid = args.url, args.model, args.pid
    if url is None:
        ensure_model(SMALL)
        proc, url = start(
            "--model-path",
            str(SMALL.path),
            "--max-concurrent-requests",
            "4",
            "--max-queued-requests",
            "8",
            "--queue-timeout",
            "20",
            LOG_LEVEL="WARNING",
        )
        model, pid = SMALL.path.name, proc.pid
    soak = Soak(url, model, args.hang_s)
    memory: list[tuple[float, float]] = []
    started = time.monotonic()
    until = started + args.minutes * 60
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await wait_ready(session, url)
            memory.append((0.0, memory_mb(pid)))
            tasks = [asyncio.create_task(worker(soak, session, seed, until)) for seed in range(args.workers)]
            rng = random.Random(99)
            while time.monotonic() < until:
                await asyncio.sleep(min(60, max(0, until - time.monotonic())))
                if time.monotonic() < until:
                    await soak.burst(session, rng, 24)
                memory.append((round(time.monotonic() - started), memory_mb(pid)))
            await asyncio.gather(*tasks)
            async with session.get(url + "/health/ready") as resp:
                still_ready = resp.status == 200
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    return {
        "minutes": args.minutes,
        "workers": args.workers,
        "outcomes": dict(soak.outcomes),
        "requests": sum(soak.outcomes.values()),
        "unexpected": soak.unexpected,
        "hung": soak.outcomes.get("hung", 0),
        "rss_mb": memory,
        "ready_at_end": still_ready,
        "exit_code": None if proc is None else proc.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--hang-s", type=float, default=60, help="a request slower than this counts as hung")
    parser.add_argument("--url", help="a running server (default: start one on the small benchmark model)")
    parser.add_argument("--model", help="with --url: the model id")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for its memory")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "soak.json")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
