"""What the gateway costs: the same upstream called directly and through genai_server (BACKEND=openai).

Starts an upstream (genai_server on the embedded engine, its own process) and a proxy in front of it (another
process), then alternates identical streaming requests between the two so that noise hits both alike, and
reports the TTFT the proxy adds (p50, p95) and its streaming throughput as a ratio of the direct one, one stream
and four at once. Writes docs/benchmarks/proxy-MODEL.json and .md.

    python benchmarks/proxy_overhead.py [--model small|tiny|scripted] [--requests 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import PROMPT, SMALL, ensure_model
from load import median, pct, stream_completion
from server_process import REPO, free_port, start, wait_ready

# "scripted": an upstream that computes nothing (scripted_upstream.py), so only the gateway's own cost is left.
MODELS = {
    "small": SMALL.path,
    "tiny": REPO / "genai_server" / "bundled_model" / "tiny-random-llama-int4",
    "scripted": Path("scripted"),
}


def start_upstream(model: str) -> tuple[subprocess.Popen[bytes], str]:
    """The upstream: genai_server on the embedded engine, or the scripted one."""
    if model != "scripted":
        return start("--model-path", str(MODELS[model]), "--max-concurrent-requests", "64")
    port = free_port()
    script = REPO / "benchmarks" / "scripted_upstream.py"
    return subprocess.Popen([sys.executable, str(script), str(port)]), f"http://127.0.0.1:{port}"


async def alternate(
    session: aiohttp.ClientSession, targets: dict[str, tuple[str, str]], tokens: int, requests: int, concurrency: int
) -> dict[str, dict[str, list[float]]]:
    """``requests`` rounds; each round sends ``concurrency`` streams to each target in turn."""
    seen: dict[str, dict[str, list[float]]] = {name: {"ttft_ms": [], "tokens_per_s": []} for name in targets}
    for _ in range(requests):
        for name, (url, model) in targets.items():
            start_s = time.perf_counter()
            results = await asyncio.gather(
                *[stream_completion(session, url, model, PROMPT, tokens) for _ in range(concurrency)]
            )
            wall = time.perf_counter() - start_s
            seen[name]["ttft_ms"].extend(r.ttft_s * 1000 for r in results)
            seen[name]["tokens_per_s"].append(sum(r.tokens for r in results) / wall)
    return seen


def summarise(seen: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    direct, proxy = seen["direct"], seen["proxy"]
    d_ttft, p_ttft = sorted(direct["ttft_ms"]), sorted(proxy["ttft_ms"])
    return {
        "direct_ttft_p50_ms": pct(d_ttft, 0.5),
        "proxy_ttft_p50_ms": pct(p_ttft, 0.5),
        "added_ttft_p50_ms": pct(p_ttft, 0.5) - pct(d_ttft, 0.5),
        "added_ttft_p95_ms": pct(p_ttft, 0.95) - pct(d_ttft, 0.95),
        "direct_tokens_per_s": median(direct["tokens_per_s"]),
        "proxy_tokens_per_s": median(proxy["tokens_per_s"]),
        "throughput_ratio": median(proxy["tokens_per_s"]) / median(direct["tokens_per_s"]),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    path = MODELS[args.model]
    if args.model == "small":
        ensure_model(SMALL)
    upstream, up_url = start_upstream(args.model)
    model = path.name
    proxy, proxy_url = start(
        "--max-concurrent-requests",
        "64",
        BACKEND="openai",
        UPSTREAM_URL=up_url + "/v1",
        MODEL_ID="via-proxy",
        UPSTREAM_MODEL=model,
    )
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await wait_ready(session, up_url)
            await wait_ready(session, proxy_url)
            targets = {"direct": (up_url, model), "proxy": (proxy_url, "via-proxy")}
            await alternate(session, targets, 8, 2, 1)  # warm-up
            results = {}
            for concurrency in (1, 4):
                seen = await alternate(session, targets, args.tokens, args.requests, concurrency)
                results[f"concurrency_{concurrency}"] = summarise(seen)
    finally:
        for proc in (proxy, upstream):
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    return {"model": args.model, "tokens_per_request": args.tokens, "rounds": args.requests, "results": results}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Proxy overhead, {report['model']} model, {report['tokens_per_request']} tokens per streamed request, "
        f"{report['rounds']} alternating rounds per level.",
        "",
        "| streams | TTFT direct p50 | TTFT via proxy p50 | added TTFT p50 | added TTFT p95 | tokens/s direct | "
        "tokens/s via proxy | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level, r in report["results"].items():
        lines.append(
            f"| {level.split('_')[1]} | {r['direct_ttft_p50_ms']:.1f} ms | {r['proxy_ttft_p50_ms']:.1f} ms | "
            f"{r['added_ttft_p50_ms']:+.1f} ms | {r['added_ttft_p95_ms']:+.1f} ms | "
            f"{r['direct_tokens_per_s']:.1f} | {r['proxy_tokens_per_s']:.1f} | {r['throughput_ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    text = markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"proxy-{args.model}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"proxy-{args.model}.md").write_text(text)


if __name__ == "__main__":
    main()
