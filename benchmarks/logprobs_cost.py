"""What logprobs cost on the embedded engine: the same greedy stream through the server's engine layer with and
without them, side by side in one process, with the event loop's lateness while each runs.

A sequence that asks for logprobs is stepped on a Generator (the Engine API gives tokens only), whose calls hold
the GIL, and each token adds a log-softmax over the vocabulary and the decoding of its alternatives.

    python benchmarks/logprobs_cost.py [MODEL_PATH] [--tokens 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from genai_server.embedded.engine import EngineConfig, OnnxEngine, SamplingOptions  # noqa: E402

DEFAULT_MODEL = REPO / "models" / "bench-random-llama-int4"


async def one_stream(engine: OnnxEngine, prompt: list[int], options: SamplingOptions) -> tuple[float, float]:
    """Tokens/s of one stream, and the p99 lateness (ms) of a 1 ms timer on the loop meanwhile."""
    late: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append((time.perf_counter() - start - 0.001) * 1000)

    task = asyncio.create_task(probe())
    started, tokens = time.perf_counter(), 0
    async for delta in engine.generate(prompt, options):
        tokens += delta.tokens
    elapsed = time.perf_counter() - started
    done.set()
    await task
    return tokens / elapsed, statistics.quantiles(late, n=100)[98]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    engine = OnnxEngine(args.model, EngineConfig(prefix_cache=0))
    await engine.start()
    prompt = engine.encode("Tell me a long story about a small cat and a large dog")
    cases = {
        "no logprobs": SamplingOptions(max_tokens=args.tokens, temperature=0.0),
        "logprobs": SamplingOptions(max_tokens=args.tokens, temperature=0.0, logprobs=0),
        "top_logprobs=5": SamplingOptions(max_tokens=args.tokens, temperature=0.0, logprobs=5),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.rounds):  # interleaved: drift on a noisy box hits every case alike
        for name, options in cases.items():
            results[name].append(await one_stream(engine, prompt, options))
    await engine.close()
    base = statistics.median(r[0] for r in results["no logprobs"])
    print(f"model {args.model.name}, {args.tokens} tokens, median of {args.rounds} rounds")
    for name, runs in results.items():
        rate, late = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"{name:>15}: {rate:7.1f} tok/s ({rate / base:.2f}x)  loop lateness p99 {late:6.2f} ms")


if __name__ == "__main__":
    asyncio.run(main())
