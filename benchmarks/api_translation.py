"""What the translated APIs cost: the same greedy answer asked for through chat completions, the Responses API and
Anthropic's Messages API, on one embedded server.

Each round sends one streaming request per API in turn (noise hits all three alike) and times, on the client, the
first generated text and the whole answer; the report gives each API's median next to chat's, as a ratio. All three
render the same prompt (one user message) and decode greedily to the same max tokens, so they generate the same
tokens; prefix reuse is off, so each is prefilled alike.

    python benchmarks/api_translation.py [--model small|tiny] [--requests 30] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import SMALL, ensure_model
from load import median
from server_process import REPO, start, wait_ready

MODELS = {"small": SMALL.path, "tiny": REPO / "genai_server" / "bundled_model" / "tiny-random-llama-int4"}
QUESTION = "Tell me a long story"
# Each API's route, its request for the same answer, and the bytes that mark an event carrying generated text.
APIS: dict[str, tuple[str, Any, bytes]] = {
    "chat": (
        "/v1/chat/completions",
        lambda model, tokens: {
            "model": model,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
        },
        b'"content":"',
    ),
    "responses": (
        "/v1/responses",
        lambda model, tokens: {
            "model": model,
            "input": QUESTION,
            "max_output_tokens": tokens,
            "temperature": 0,
            "stream": True,
        },
        b"response.output_text.delta",
    ),
    "messages": (
        "/v1/messages",
        lambda model, tokens: {
            "model": model,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
        },
        b'"text_delta"',
    ),
}


async def timed(session: aiohttp.ClientSession, url: str, api: str, model: str, tokens: int) -> tuple[float, float]:
    """One streamed answer: seconds to its first generated text, and to its end."""
    path, body, marker = APIS[api]
    start_s = time.perf_counter()
    first = None
    async with session.post(url + path, json=body(model, tokens)) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if first is None and marker in line:
                first = time.perf_counter() - start_s
    end = time.perf_counter() - start_s
    return (first if first is not None else end), end


async def measure(url: str, model: str, requests: int, tokens: int) -> dict[str, dict[str, float]]:
    seen: dict[str, dict[str, list[float]]] = {api: {"ttft_ms": [], "e2e_ms": []} for api in APIS}
    async with aiohttp.ClientSession() as session:
        for api in APIS:  # one of each first, unmeasured: caches and code paths warmed alike
            await timed(session, url, api, model, tokens)
        for _ in range(requests):
            for api in APIS:
                ttft, e2e = await timed(session, url, api, model, tokens)
                seen[api]["ttft_ms"].append(ttft * 1000)
                seen[api]["e2e_ms"].append(e2e * 1000)
    return {api: {name: median(values) for name, values in figures.items()} for api, figures in seen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    if args.model == "small":
        ensure_model(SMALL)
    proc, url = start("--model-path", str(MODELS[args.model]), PREFIX_CACHE_CONVERSATIONS="0")
    try:
        figures = asyncio.run(_run(url, proc, args.requests, args.tokens))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    chat = figures["chat"]
    print(f"{args.requests} rounds, {args.tokens} tokens, model {args.model}; medians, ratio to chat")
    for api, values in figures.items():
        ratios = "  ".join(f"{name} {values[name]:8.1f} ms ({values[name] / chat[name]:.2f}x)" for name in values)
        print(f"  {api:10s} {ratios}")


async def _run(url: str, proc: subprocess.Popen[bytes], requests: int, tokens: int) -> dict[str, dict[str, float]]:
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, url, proc)
        async with session.get(url + "/v1/models") as resp:
            model: str = (await resp.json())["data"][0]["id"]
    return await measure(url, model, requests, tokens)


if __name__ == "__main__":
    main()
