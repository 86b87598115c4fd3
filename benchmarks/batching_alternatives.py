"""In-process throughput of the batching designs ONNX Runtime GenAI allows, side by side in one run.

No server, no HTTP: what each way of sharing the model between N concurrent greedy
streams can reach at best on this machine. Used to choose the scheduler's design
(docs/performance.md): one Engine with static batch B, two Engines stepped in turn,
and one Generator with batch_size=N.

    python benchmarks/batching_alternatives.py MODEL_PATH [--tokens 128]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
from bare import greedy_request, load_model

PROMPT = (np.arange(64, dtype=np.int32) % 200) + 3


def engines(model: og.Model, streams: int, tokens: int, lanes: int = 1) -> float:
    """Aggregate tokens/s of ``streams`` requests spread over ``lanes`` Engines stepped in turn."""
    lane_engines = [og.Engine(model) for _ in range(lanes)]
    buffers = [e.create_event_buffer(256) for e in lane_engines]
    requests = []
    start = time.perf_counter()
    for i in range(streams):
        requests.append(greedy_request(lane_engines[i % lanes], PROMPT, tokens))
    produced = 0
    while any(e.has_pending_requests() for e in lane_engines):
        for engine, buf in zip(lane_engines, buffers, strict=True):
            if engine.has_pending_requests():
                produced += sum(1 for ev in engine.run(buf) if ev.flags & og.EngineEventFlags.TOKEN)
    return produced / (time.perf_counter() - start)


def generator(model: og.Model, streams: int, tokens: int) -> float:
    """Aggregate tokens/s of one Generator holding all ``streams`` sequences as one batch."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + tokens, do_sample=False, batch_size=streams)
    gen = og.Generator(model, params)
    start = time.perf_counter()
    gen.append_tokens(np.tile(PROMPT, (streams, 1)))
    steps = 0
    while not gen.is_done():
        gen.generate_next_token()
        steps += 1
    return streams * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    model = load_model(args.model, 8)
    engines(model, 1, 8)  # warm-up: the first run pays for allocations and thread start-up
    base = engines(model, 1, args.tokens)
    rows = [("Engine, 1 stream", base)]
    for n in (2, 4, 8):
        rows.append((f"Engine batch 8, {n} streams", engines(model, n, args.tokens)))
    model4 = load_model(args.model, 4)
    rows.append(("Engine batch 4, 8 streams (two batches in a row)", engines(model4, 8, args.tokens)))
    rows.append(("2 Engines of batch 4, 8 streams stepped in turn", engines(model4, 8, args.tokens, lanes=2)))
    for n in (1, 4, 8):
        rows.append((f"Generator batch_size={n}", generator(model, n, args.tokens)))
    print(f"model {args.model.name}, 64-token prompt, {args.tokens} tokens per stream, greedy")
    for name, tps in rows:
        print(f"  {name:50s} {tps:8.1f} tok/s  {tps / base:5.2f}x")


if __name__ == "__main__":
    main()
