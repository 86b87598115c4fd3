"""The baseline: the same model driven in-process with no server, as its own process.

Prints ``loaded`` once model, tokenizer and engine are loaded, then a JSON line
with the load time; then, for every line ``N`` read from stdin, generates one
greedy stream of up to N tokens on the Engine API and prints a JSON line with
the tokens, the seconds from submit to the last token (as the benchmark times
the server) and the process's resident memory. ``run.py`` alternates these runs
with runs through the server, so both are measured side by side.

    python benchmarks/bare.py MODEL_PATH --prompt TEXT
    python benchmarks/bare.py MODEL_PATH --prompt TEXT --figures LONG_PROMPT   # vs_llama_cpp.py's "engine alone"

With ``--figures`` it loads the Engine with the server's batch size and answers lines instead: ``decode N TOKENS``
(N streams of TOKENS tokens, two static batches back to back, as the benchmark's N clients each send two requests:
aggregate tokens/s) and ``prefill`` (LONG_PROMPT and one token: prompt tokens/s), one JSON line each, so that
vs_llama_cpp.py alternates them with the same figures through the servers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime_genai as og


def rss_mb() -> float:
    """This process's resident memory in MiB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def one_stream(engine: og.Engine, prompt: list[int], tokens: int) -> tuple[int, float]:
    """Generate greedily; returns (tokens, seconds from submit to the last token)."""
    return batch(engine, prompt, tokens, 1)


def greedy_request(engine: og.Engine, prompt: Sequence[int] | npt.NDArray[np.int32], tokens: int) -> og.Request:
    """A greedy turn of ``tokens`` tokens on ``prompt``, begun on ``engine`` (the caller keeps it alive). Its KV cache
    is sized for exactly that, as small as the engine allows (the server rounds up to a size class): the engine at
    its best, so that the server's share is not flattered by the runtime's whole-context default."""
    sizing = og.RequestOptions()
    sizing.set_max_session_tokens(len(prompt) + tokens)
    request = engine.create_request(options=sizing)
    opts = og.TurnOptions(request)
    opts.set_max_generated_tokens(tokens)
    opts.set_do_sample(False)
    request.begin_turn(prompt, opts)
    return request


def batch(engine: og.Engine, prompt: list[int], tokens: int, streams: int) -> tuple[int, float]:
    """``streams`` greedy sequences of the same prompt started together (one static batch, as the server batches a
    burst); returns (tokens, seconds from submit to the last token)."""
    buf = engine.create_event_buffer(256)
    start = time.perf_counter()
    requests = []
    for _ in range(streams):
        requests.append(greedy_request(engine, prompt, tokens))
    n = 0
    while engine.has_pending_requests():
        n += sum(1 for ev in engine.run(buf) if ev.flags & og.EngineEventFlags.TOKEN)
    elapsed = time.perf_counter() - start
    for request in requests:
        request.close()
    return n, elapsed


def serve_figures(path: Path, prompt: str, long_prompt: str) -> None:
    """What the engine alone reaches, in the server's settings (batch 8, its threads), one figure per line asked
    on stdin (see the module's docstring)."""
    model = load_model(path, max_batch=8)
    tokenizer = og.Tokenizer(model)
    engine = og.Engine(model)
    ids = [int(t) for t in tokenizer.encode(prompt)]
    long_ids = [int(t) for t in tokenizer.encode(long_prompt)]
    batch(engine, ids, 8, 2)  # warm-up
    print("loaded", flush=True)
    for line in sys.stdin:
        match line.split():
            case ["decode", streams, tokens]:
                runs = [batch(engine, ids, int(tokens), int(streams)) for _ in range(2)]
                value = sum(n for n, _ in runs) / sum(seconds for _, seconds in runs)
            case ["prefill"]:
                value = len(long_ids) / batch(engine, long_ids, 1, 1)[1]
            case _:
                raise SystemExit(f"unknown command: {line!r}")
        print(json.dumps({"value": value}), flush=True)


def load_model(path: Path, max_batch: int | None = None) -> og.Model:
    """The model as the server loads it by default: one intra-op thread per CPU this process may use
    (ENGINE_THREADS), so the baseline and the server compute on the same cores; and, if given, the Engine's static
    batch size."""
    config = og.Config(str(path))
    threads = len(os.sched_getaffinity(0))
    overlay: dict[str, Any] = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
    if max_batch is not None:
        overlay["engine"] = {"static_batching": {"max_batch_size": max_batch}}
    config.overlay(json.dumps(overlay))
    return og.Model(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--figures", metavar="LONG_PROMPT", help="answer figures asked on stdin (see above)")
    args = parser.parse_args()
    if args.figures:
        serve_figures(args.model, args.prompt, args.figures)
        return

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
