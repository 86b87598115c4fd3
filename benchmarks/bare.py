"""The baseline: the same model driven in-process with no server, as its own process.

Prints ``loaded`` once model, tokenizer and engine are loaded, then a JSON line
with the load time; then, for every line ``N`` read from stdin, generates one
greedy stream of up to N tokens on the Engine API and prints a JSON line with
the tokens, the seconds from submit to the last token (as the benchmark times
the server) and the process's resident memory. ``run.py`` alternates these runs
with runs through the server, so both are measured side by side.

    python benchmarks/bare.py MODEL_PATH --prompt TEXT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import onnxruntime_genai as og


def rss_mb() -> float:
    """This process's resident memory in MiB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def one_stream(engine: og.Engine, prompt: list[int], tokens: int) -> tuple[int, float]:
    """Generate greedily; returns (tokens, seconds from submit to the last token)."""
    buf = engine.create_event_buffer(64)
    start = time.perf_counter()
    request = engine.create_request()
    opts = og.TurnOptions(request)
    opts.set_max_generated_tokens(tokens)
    opts.set_do_sample(False)
    request.begin_turn(prompt, opts)
    n = 0
    while engine.has_pending_requests():
        n += sum(1 for ev in engine.run(buf) if ev.flags & og.EngineEventFlags.TOKEN)
    elapsed = time.perf_counter() - start
    request.close()
    return n, elapsed


def load_model(path: Path) -> og.Model:
    """The model as the server loads it by default: one intra-op thread per CPU this process may use
    (ENGINE_THREADS), so the baseline and the server compute on the same cores."""
    config = og.Config(str(path))
    threads = len(os.sched_getaffinity(0))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--prompt", required=True)
    args = parser.parse_args()

    start = time.perf_counter()
    model = load_model(args.model)
    tokenizer = og.Tokenizer(model)
    engine = og.Engine(model)
    print("loaded", flush=True)  # the parent times spawn -> this line, as it times the server's start-up
    print(json.dumps({"load_s": time.perf_counter() - start}), flush=True)
    prompt = [int(t) for t in tokenizer.encode(args.prompt)]
    for line in sys.stdin:
        tokens, seconds = one_stream(engine, prompt, int(line))
        print(json.dumps({"tokens": tokens, "seconds": seconds, "rss_mb": rss_mb()}), flush=True)


if __name__ == "__main__":
    main()
