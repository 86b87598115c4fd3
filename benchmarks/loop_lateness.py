"""Measure how much each ONNX Runtime GenAI API stalls an asyncio event loop.

Why this exists: the server must keep answering (health checks, other streams,
new connections) while tokens are generated. The Generator API holds the GIL
inside each call; the Engine API releases it. This script drives each from a
worker thread, exactly as the server would, while the event loop measures how
late a 1 ms timer fires. Both runs happen side by side in one process, so the
ratio is meaningful on a noisy machine.

    python benchmarks/loop_lateness.py [MODEL_PATH] [--tokens 200] [--prompt-tokens 600]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
from bare import load_model, one_stream

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "genai_server" / "bundled_model" / "tiny-random-llama-int4"


def generator_loop(model: og.Model, prompt: np.ndarray, tokens: int) -> int:
    """One greedy stream through the Generator API; returns tokens generated."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    n = 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    return n


def engine_loop(model: og.Model, prompt: np.ndarray, tokens: int) -> int:
    """One greedy stream through the Engine API (as bare.py runs it); returns tokens generated."""
    generated, _ = one_stream(og.Engine(model), [int(t) for t in prompt], tokens)
    return generated


async def measure(work: Callable[[], int]) -> dict[str, float]:
    """Run ``work`` in a thread while sampling the loop's lateness on 1 ms timers."""
    loop = asyncio.get_running_loop()
    done = threading.Event()
    result: list[int] = []

    def target() -> None:
        result.append(work())
        done.set()

    start = time.perf_counter()
    threading.Thread(target=target, daemon=True).start()
    lateness = []
    while not done.is_set():
        t0 = loop.time()
        await asyncio.sleep(0.001)
        lateness.append((loop.time() - t0 - 0.001) * 1000)
    elapsed = time.perf_counter() - start
    lateness.sort()
    return {
        "tokens_per_s": result[0] / elapsed,
        "lateness_p50_ms": statistics.median(lateness),
        "lateness_p99_ms": lateness[min(len(lateness) - 1, int(len(lateness) * 0.99))],
        "lateness_max_ms": lateness[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=600)
    args = parser.parse_args()
    model = load_model(args.model)
    prompt = np.arange(5, 5 + args.prompt_tokens, dtype=np.int32) % 250 + 3
    print(f"model {args.model.name}, prompt {args.prompt_tokens} tokens, {args.tokens} new tokens")
    rows = {}
    for name, fn in (("generator", generator_loop), ("engine", engine_loop)):
        rows[name] = asyncio.run(measure(lambda fn=fn: fn(model, prompt, args.tokens)))  # type: ignore[misc]
    for name, row in rows.items():
        print(f"{name:10s} " + "  ".join(f"{k} {v:8.2f}" for k, v in row.items()))
    g, e = rows["generator"], rows["engine"]
    print(
        f"ratio generator/engine: lateness p99 {g['lateness_p99_ms'] / max(e['lateness_p99_ms'], 1e-3):.1f}x, "
        f"tokens/s {g['tokens_per_s'] / e['tokens_per_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
