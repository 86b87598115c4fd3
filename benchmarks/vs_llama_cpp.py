"""genai_server against llama.cpp's llama-server on the same weights, with the same client, side by side.

The benchmark model's Hugging Face weights become this server's INT4 folder (scripts/make_model.py) and
llama-server's Q4_0 GGUF (scripts/build_llama_server.py), so both engines run the same network. Both servers run
at once with every core at their disposal, and each measurement alternates between them so that noise on the shared
machine hits both alike. Reported as ratios (genai_server / llama-server): decode tokens/s at 1, 4 and 8 streams,
time to first token of a short chat and of a ~1000-token prompt, prefill tokens/s, peak resident memory at each
concurrency (the server's with its engine process) and resident memory after the run.

    python scripts/make_model.py bench && python scripts/build_llama_server.py build \\
        && python scripts/build_llama_server.py gguf bench
    python benchmarks/vs_llama_cpp.py [--model bench|realistic] [--rounds 3] [--tokens 64]

Skips (exit 0) when llama-server or the GGUF is not built: it is not part of CI. Writes
docs/benchmarks/vs-llama-cpp-MODEL.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import PROMPT  # noqa: E402 - benchmarks/ is put on the path just above
from build_llama_server import SERVER  # noqa: E402 - scripts/ is put on the path just above
from llama_server import gguf_path, start_llama_server  # noqa: E402
from load import run_level  # noqa: E402
from make_model import PRESETS  # noqa: E402
from server_process import memory_mb, reset_peak_memory, start, wait_ready  # noqa: E402
from targets import SERVER_VS_ENGINE_TARGET, VERSUS_TARGETS, mark  # noqa: E402

LEVELS = (1, 4, 8)
SHORT_CHAT = [{"role": "user", "content": "Hello! How are you today?"}]
# ~1000 tokens for the benchmark models' tokenizers (checked against usage.prompt_tokens in the report).
LONG_PROMPT = " ".join(["the river runs past the old city at night and the light is green"] * 70)


async def _first_token_ms(session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any]) -> float:
    """Time from sending a streaming request to its first content-bearing chunk."""
    started = time.perf_counter()
    async with session.post(url + path, json={**body, "stream": True, "temperature": 0}) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            has_text = b'"content":"' in raw or b'"text":"' in raw
            if raw.startswith(b"data: {") and has_text and b'"content":""' not in raw and b'"text":""' not in raw:
                return (time.perf_counter() - started) * 1000
    return (time.perf_counter() - started) * 1000


async def _prefill(session: aiohttp.ClientSession, url: str, model: str, fresh: str) -> tuple[float, int]:
    """A ~1000-token prompt (after ``fresh``, its own beginning) and one token: (seconds, prompt tokens) -> prefill
    tokens/s."""
    started = time.perf_counter()
    body = {"model": model, "prompt": fresh + LONG_PROMPT, "max_tokens": 1, "temperature": 0}
    async with session.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        usage = (await resp.json())["usage"]
    return time.perf_counter() - started, int(usage["prompt_tokens"])


async def measure(
    targets: dict[str, tuple[str, str, int]], alone: EngineAlone, rounds: int, tokens: int
) -> dict[str, dict[str, Any]]:
    """Alternate every measurement between the targets (url, model, pid) and the engine alone, ``rounds`` times;
    medians per target. The peak resident memory of each level is the server's with its children (our engine
    process), reset before it."""
    seen: dict[str, dict[str, list[float]]] = {name: {} for name in [*targets, "engine alone"]}
    sent = itertools.count()

    def add(name: str, key: str, value: float) -> None:
        seen[name].setdefault(key, []).append(value)

    # A connection per request for both: llama-server closes idle keep-alive connections that the client's pool
    # would otherwise reuse mid-close.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
        for url, model, _ in targets.values():  # warm-up
            await run_level(session, url, model, PROMPT, 8, 2, 1)
        for _ in range(rounds):
            for name, (url, model, pid) in targets.items():
                for level in LEVELS:
                    reset_peak_memory(pid)
                    result = await run_level(session, url, model, PROMPT, tokens, level, 2)
                    add(name, f"tokens_per_s_{level}", result.tokens_per_s)
                    add(name, f"peak_rss_mb_{level}", memory_mb(pid, "VmHWM"))
                for _ in range(5):
                    # Each prompt starts with a number of its own, so that neither server serves it from a cache:
                    # these figures compare engines (the prompt caches are chat_turns.py's).
                    fresh = f"{next(sent)}. "
                    messages = [{"role": "user", "content": fresh + SHORT_CHAT[0]["content"]}]
                    chat = {"model": model, "messages": messages, "max_tokens": 2}
                    add(name, "ttft_short_chat_ms", await _first_token_ms(session, url, "/v1/chat/completions", chat))
                    long = {"model": model, "prompt": fresh + LONG_PROMPT, "max_tokens": 2}
                    add(name, "ttft_long_prompt_ms", await _first_token_ms(session, url, "/v1/completions", long))
                seconds, prompt_tokens = await _prefill(session, url, model, f"{next(sent)}. ")
                add(name, "prefill_tokens_per_s", prompt_tokens / seconds)
                add(name, "long_prompt_tokens", prompt_tokens)
            for level in LEVELS:
                add("engine alone", f"tokens_per_s_{level}", alone.ask(f"decode {level} {tokens}"))
            add("engine alone", "prefill_tokens_per_s", alone.ask("prefill"))
    return {name: {key: statistics.median(values) for key, values in keys.items()} for name, keys in seen.items()}


class EngineAlone:
    """The bare Engine in its own process with the server's settings (bare.py --figures), asked for one figure at a
    time so that it is measured in turn with the servers, in the same conditions: where the limit lies."""

    def __init__(self, model_path: Path) -> None:
        command = [sys.executable, str(REPO / "benchmarks" / "bare.py"), str(model_path), "--prompt", PROMPT]
        self.proc = subprocess.Popen(
            [*command, "--figures", LONG_PROMPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._read()  # "loaded"

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("bare.py ended")
        return line

    def ask(self, command: str) -> float:
        """One figure (``decode N TOKENS`` or ``prefill``), measured now."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return float(json.loads(self._read())["value"])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def report(figures: dict[str, dict[str, Any]]) -> dict[str, float]:
    """genai_server / llama-server for each figure (higher is better for rates, lower for times and memory)."""
    ours, theirs = figures["genai_server"], figures["llama-server"]
    return {key: ours[key] / theirs[key] for key in ours if key != "long_prompt_tokens"}


def limits(figures: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """For the rates the engine alone was measured on: server / engine alone (our cost) and engine alone /
    llama-server (the engine's)."""
    alone = figures.get("engine alone", {})
    return {
        key: {
            "server_vs_engine": figures["genai_server"][key] / value,
            "engine_vs_llama_server": value / figures["llama-server"][key],
        }
        for key, value in alone.items()
    }


def markdown(model: str, figures: dict[str, dict[str, Any]], ratios: dict[str, float]) -> str:
    lines = [
        f"genai_server (INT4) vs llama-server (Q4_0), {model} model, same weights, same client, alternating.",
        "",
        "| figure | genai_server | llama-server | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for key, ratio in ratios.items():
        target = VERSUS_TARGETS.get(key)
        judged = "" if target is None else f" (target {'>=' if target[1] else '<='} {target[0]}x){_miss(key, ratio)}"
        lines.append(
            f"| {key} | {figures['genai_server'][key]:.1f} | {figures['llama-server'][key]:.1f} "
            f"| {ratio:.2f}x{judged} |"
        )
    bounds = limits(figures)
    if bounds:
        lines += [
            "",
            "Where the limit lies: the bare Engine in its own process, same settings (batch 8, same threads), measured"
            f" in turn with the servers; the server's own share (middle column) has a target of >= "
            f"{SERVER_VS_ENGINE_TARGET}x.",
            "",
            "| figure | engine alone | genai_server / engine alone | engine alone / llama-server |",
            "| --- | --- | --- | --- |",
        ]
        for key, pair in bounds.items():
            ours = pair["server_vs_engine"]
            lines.append(
                f"| {key} | {figures['engine alone'][key]:.1f} | {ours:.2f}x{mark(ours >= SERVER_VS_ENGINE_TARGET)} "
                f"| {pair['engine_vs_llama_server']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def _miss(key: str, ratio: float) -> str:
    target, higher = VERSUS_TARGETS[key]
    return mark(ratio >= target if higher else ratio <= target)


async def compare(model: str, rounds: int = 3, tokens: int = 64) -> dict[str, Any] | None:
    """Both servers and the engine alone on one benchmark model: figures, ratios and limits; None when llama-server
    or the model is not built (it says what is missing)."""
    preset = PRESETS[model]
    gguf = gguf_path(model)
    missing = [str(path) for path in (SERVER, gguf, preset.output) if not path.exists()]
    if missing:
        print(f"llama.cpp comparison skipped: not built: {', '.join(missing)} (see vs_llama_cpp.py's docstring)")
        return None
    ours, our_url = start("--model-path", str(preset.output), "--max-concurrent-requests", "16")
    theirs, their_url = start_llama_server(gguf, preset.context_length)
    alone = EngineAlone(preset.output)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, our_url)
            await wait_ready(session, their_url)
        targets = {
            "genai_server": (our_url, preset.output.name, ours.pid),
            "llama-server": (their_url, gguf.name, theirs.pid),
        }
        figures = await measure(targets, alone, rounds, tokens)
        figures["genai_server"]["rss_mb"] = memory_mb(ours.pid)
        figures["llama-server"]["rss_mb"] = memory_mb(theirs.pid)
    finally:
        alone.stop()
        for proc in (ours, theirs):
            proc.terminate()
            proc.wait(timeout=60)
    return {"model": model, "figures": figures, "ratios": report(figures), "limits": limits(figures)}


async def main_async(args: argparse.Namespace) -> None:
    document = await compare(args.model, args.rounds, args.tokens)
    if document is None:
        return
    text = markdown(args.model, document["figures"], document["ratios"])
    print(text)
    out = REPO / "docs" / "benchmarks" / f"vs-llama-cpp-{args.model}"
    out.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)


def main() -> None:
    """Parse the options and run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bench", "realistic"], default="bench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
