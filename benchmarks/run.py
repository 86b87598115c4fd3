"""The performance benchmark: every figure of docs/performance.md, measured side by side in one run.

For each model it runs a bare in-process baseline and the real server (each in
its own process), then measures through HTTP/SSE: single-stream tokens/s against
the bare loop, aggregate tokens/s and TTFT/TPOT p50/p95 at concurrency 1/2/4/8,
event-loop lateness and /health latency while 4 streams generate, the TTFT of a
request that arrives while 3 others stream, resident memory and start-up time.
Builds the benchmark models it needs with scripts/make_model.py.

    python benchmarks/run.py            # small and realistic models, writes docs/benchmarks/
    python benchmarks/run.py --quick    # small model only, < 2 minutes, prints the ratios (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import PROMPT, REALISTIC, SMALL, ModelSpec, ensure_model
from load import LevelResult, median, pct, poll_health, run_level, stream_completion
from server_process import REPO, free_port, memory_mb, wait_ready
from targets import TARGETS, meets

LEVELS = (1, 2, 4, 8)
# Engine settings (batch x lanes) measured side by side: the server's default first, then the alternatives.
FULL_CONFIGS = ("8x2", "4x2", "8x1")
QUICK_CONFIGS = ("8x2",)


@dataclass(frozen=True)
class Profile:
    """How much to measure."""

    models: tuple[ModelSpec, ...]
    per_worker: int
    ttft_probes: int
    single_repeat: int


PROFILES = {
    "quick": Profile((SMALL,), per_worker=2, ttft_probes=5, single_repeat=5),
    "full": Profile((SMALL, REALISTIC), per_worker=2, ttft_probes=7, single_repeat=5),
}


class Bare:
    """benchmarks/bare.py as a process: the model in-process, no server, one stream on request."""

    def __init__(self, spec: ModelSpec) -> None:
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / "bare.py"), str(spec.path), "--prompt", PROMPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self._in, self._out = self.proc.stdin, self.proc.stdout
        assert self._out.readline().strip() == "loaded"
        self.ready_s = time.perf_counter() - start
        self.load_s = float(json.loads(self._out.readline())["load_s"])
        self.rss_mb = 0.0

    def stream(self, tokens: int) -> float:
        """One greedy stream; returns its tokens/s (tokens / (last token - submit))."""
        self._in.write(f"{tokens}\n")
        self._in.flush()
        result = json.loads(self._out.readline())
        self.rss_mb = result["rss_mb"]
        return float(result["tokens"] / result["seconds"])

    def stop(self) -> None:
        self._in.close()
        self.proc.wait(timeout=60)


class Server:
    """benchmarks/bench_server.py (the real app plus a loop probe) as a process."""

    def __init__(self, spec: ModelSpec, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_id = spec.path.name
        args = [
            "--model-path",
            str(spec.path),
            "--server-port",
            str(self.port),
            "--max-concurrent-requests",
            "64",
            *extra,
        ]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "bench_server.py"), *args])
        self.ready_s = 0.0

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        await wait_ready(session, self.url, self.proc, timeout_s=300)
        self.ready_s = time.perf_counter() - self.started

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def ttft_under_load(
    session: aiohttp.ClientSession, server: Server, spec: ModelSpec, probes: int
) -> tuple[list[float], list[float]]:
    """TTFT (ms) of short probe requests on an idle server, then while 3 other clients keep streaming. Each probe's
    prompt starts with a number of its own: the same prompt again would be served from the kept prefix."""
    sent = itertools.count()

    async def probe() -> float:
        prompt = f"{next(sent)}. {PROMPT}"
        return (await stream_completion(session, server.url, server.model_id, prompt, 4)).ttft_s * 1000

    idle = [await probe() for _ in range(probes)]
    stop = asyncio.Event()

    async def background() -> None:
        while not stop.is_set():
            await stream_completion(session, server.url, server.model_id, PROMPT, spec.tokens)

    others = [asyncio.create_task(background()) for _ in range(3)]
    loaded = []
    for i in range(probes):
        # Arrive at different points of the others' generation, not in step with it.
        await asyncio.sleep(0.3 + 0.37 * i)
        loaded.append(await probe())
    stop.set()
    await asyncio.gather(*others)
    return idle, loaded


async def single_streams(
    session: aiohttp.ClientSession, server: Server, bare: Bare, spec: ModelSpec, repeat: int
) -> tuple[list[float], list[float]]:
    """One stream at a time, alternating bare and server so noise hits both alike; tokens/s of each."""
    bare_runs, server_runs = [], []
    for _ in range(repeat):
        bare_runs.append(bare.stream(spec.tokens))
        result = await stream_completion(session, server.url, server.model_id, PROMPT, spec.tokens)
        server_runs.append(result.tokens / result.e2e_s)
    return bare_runs, server_runs


async def measure(spec: ModelSpec, profile: Profile, extra: list[str]) -> dict[str, Any]:
    """Every figure for one model and engine config: the bare process and the server side by side."""
    bare = Bare(spec)
    server = Server(spec, extra)
    timeout = aiohttp.ClientTimeout(total=600)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            await server.wait_ready(session)
            bare.stream(spec.tokens)  # warm-up, and the same one stream on both before reading memory
            await stream_completion(session, server.url, server.model_id, PROMPT, spec.tokens)
            rss, bare_rss = memory_mb(server.proc.pid), bare.rss_mb
            bare_tps, server_tps = await single_streams(session, server, bare, spec, profile.single_repeat)
            bare.stop()
            levels, health, loop_stats = await concurrency_levels(session, server, spec, profile)
            idle, loaded = await ttft_under_load(session, server, spec, profile.ttft_probes)
            peak = memory_mb(server.proc.pid, "VmHWM")
    finally:
        server.stop()
        if bare.proc.poll() is None:
            bare.proc.kill()
    return {
        "bare": {"ready_s": bare.ready_s, "load_s": bare.load_s, "rss_mb": bare_rss, "tokens_per_s": bare_tps},
        "server": {
            "ready_s": server.ready_s,
            "rss_mb": rss,
            "rss_peak_mb": peak,
            "tokens_per_s": server_tps,
            "levels": [levels[c].summary() for c in LEVELS],
            "loop_lateness_ms": loop_stats,
            "health_p50_ms": pct(sorted(health), 0.5),
            "health_p99_ms": pct(sorted(health), 0.99),
            "ttft_idle_ms": idle,
            "ttft_loaded_ms": loaded,
        },
    }


async def concurrency_levels(
    session: aiohttp.ClientSession, server: Server, spec: ModelSpec, profile: Profile
) -> tuple[dict[int, LevelResult], list[float], dict[str, float]]:
    """Each concurrency level in turn; at 4 streams also the loop lateness and /health latency."""
    levels: dict[int, LevelResult] = {}
    health: list[float] = []
    loop_stats: dict[str, float] = {}
    for c in LEVELS:
        if c != 4:
            levels[c] = await run_level(
                session, server.url, server.model_id, PROMPT, spec.tokens, c, profile.per_worker
            )
            continue
        await session.post(server.url + "/_bench/loop")  # open a lateness window for this level only
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_health(session, server.url, stop))
        levels[c] = await run_level(session, server.url, server.model_id, PROMPT, spec.tokens, c, profile.per_worker)
        loop_stats = await (await session.get(server.url + "/_bench/loop")).json()
        stop.set()
        health = await poller
    return levels, health, loop_stats


def ratios(run: dict[str, Any]) -> dict[str, float]:
    """The figures of the target table."""
    bare, server = run["bare"], run["server"]
    by_c = {level["concurrency"]: level for level in server["levels"]}
    return {
        "single_stream_vs_bare": median(server["tokens_per_s"]) / median(bare["tokens_per_s"]),
        "x4_vs_1": by_c[4]["tokens_per_s"] / by_c[1]["tokens_per_s"],
        "x8_vs_1": by_c[8]["tokens_per_s"] / by_c[1]["tokens_per_s"],
        "loop_lateness_p99_ms": server["loop_lateness_ms"].get("p99_ms", float("nan")),
        "health_p99_ms": server["health_p99_ms"],
        "ttft_loaded_vs_idle_p50": median(server["ttft_loaded_ms"]) / median(server["ttft_idle_ms"]),
        "rss_vs_bare": server["rss_mb"] / bare["rss_mb"],
        "ready_vs_bare_load": server["ready_s"] / bare["ready_s"],
    }


def print_ratios(model: str, figures: dict[str, float]) -> None:
    print(f"\n{model}:")
    for name, value in figures.items():
        target, higher = TARGETS[name]
        mark = "meets" if meets(name, value) else "MISSES"
        print(f"  {name:26s} {value:8.2f}   target {'>=' if higher else '<='} {target:<5} {mark}")


def read_bandwidth_gb_s() -> float:
    """Memory read bandwidth of this machine: best of 5 sums over a 512 MiB array (far beyond the caches)."""
    import numpy as np

    data = np.ones(128 * 1024 * 1024, dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def weight_bytes_per_token(spec: ModelSpec) -> int:
    """Bytes of weights one decode step reads: every weight file, less the embedding table, of which a
    step reads one row (the builder keeps it unquantized: vocab x hidden float32)."""
    config = json.loads((spec.path / "genai_config.json").read_text())["model"]
    files = sum(f.stat().st_size for f in spec.path.iterdir() if f.name.startswith("model.onnx"))
    return int(files - config["vocab_size"] * config["decoder"]["hidden_size"] * 4)


def parse_config(text: str) -> tuple[str, list[str]]:
    """'8x1' -> engine batch 8, 1 lane; '8x1w0' -> the same with no batch wait; a trailing 'i' ('8x2i') -> the
    engine in the server's own process (ENGINE_PROCESS=false) instead of behind its process wall."""
    in_process = text.endswith("i")
    batch, rest = text.removesuffix("i").split("x")
    lanes, _, wait = rest.partition("w")
    extra = ["--engine-max-batch-size", batch, "--engine-lanes", lanes]
    extra += ["--engine-batch-wait-ms", wait] if wait else []
    return text, extra + (["--no-engine-process"] if in_process else [])


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    profile = PROFILES["quick" if args.quick else "full"]
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "profile": "quick" if args.quick else "full",
        "prompt": PROMPT,
        "models": {},
        "read_bandwidth_gb_s": read_bandwidth_gb_s(),
    }
    for spec in profile.models:
        if args.models and spec.name not in args.models:
            continue
        ensure_model(spec)
        entry: dict[str, Any] = {
            "tokens_per_request": spec.tokens,
            "configs": {},
            "weight_bytes_per_token": weight_bytes_per_token(spec),
        }
        for config in args.configs or (QUICK_CONFIGS if args.quick else FULL_CONFIGS):
            label, extra = parse_config(config)
            run = await measure(spec, profile, extra)
            run["ratios"] = ratios(run)
            entry["configs"][label] = run
            print_ratios(f"{spec.name} model, engine {label} (batch x lanes)", run["ratios"])
        results["models"][spec.name] = entry
    if not args.quick and (not args.models or "realistic" in args.models):
        # The yardsticks, on the realistic model: llama-server on the same weights, and chats of five turns.
        import chat_turns
        import vs_llama_cpp

        results["vs_llama_cpp"] = await vs_llama_cpp.compare("realistic")
        results["chat_turns"] = await chat_turns.compare("realistic")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model only, fewer requests; prints ratios")
    parser.add_argument("--models", nargs="*", choices=["small", "realistic"], help="only these models")
    parser.add_argument(
        "--configs",
        nargs="*",
        help="engine configs BATCHxLANES[wMS][i] to compare (i: engine in the server's process), the default first "
        f"(default: {' '.join(FULL_CONFIGS)}; --quick: {QUICK_CONFIGS[0]})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write results.json/.md and plots here (default: docs/benchmarks for a full run, nothing for --quick)",
    )
    parser.add_argument(
        "--replot", type=Path, metavar="RESULTS_JSON", help="measure nothing: redraw the plots of a saved results.json"
    )
    args = parser.parse_args()
    if args.replot:
        from report import plots, yardstick_plots

        saved = json.loads(args.replot.read_text())
        plots(saved, args.replot.parent)
        yardstick_plots(saved, args.replot.parent)
        print(f"redrew the plots in {args.replot.parent}")
        return
    results = asyncio.run(main_async(args))
    out = args.out or (None if args.quick else REPO / "docs" / "benchmarks")
    if out is not None:
        from report import write_report

        write_report(results, out)
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
