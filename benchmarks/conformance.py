"""Latency conformance: do this server's own per-request figures agree with real benchmark clients'?

Real benchmark clients (vLLM's ``vllm bench serve``, GuideLLM, NVIDIA AIPerf), each from a virtual environment of its
own under ``.cache/conformance/``, drive the embedded server (the realistic model) and a gateway relaying to it. Every
request the tool times is paired with the access-log line the server wrote for it (``LOG_FORMAT=json``): by request
id where the tool sends one (``X-Request-Id``), else by order, which holds at concurrency 1. Per tool and figure it
reports the median ratio server/client, the worst per-request difference and, for TTFT and E2E, how many requests
agree within max(2 ms, 5 %). Each figure is the tool's own definition (read in its installed source, cited above
each run_* below), and the server's figure is converted to it where they differ. A run at concurrency 4 is compared by
medians only, since requests no longer finish in the order they were sent. inference-perf is not run (NOT_RUN).

    python benchmarks/conformance.py [--install] [--requests 20] [--concurrent-requests 16] [--tools vllm,aiperf]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from bench_models import REALISTIC, ensure_model
from server_process import REPO, start, wait_ready

VENVS = REPO / ".cache" / "conformance"
MODEL_ID = "conformance-qwen"
# The model folder carries its Hugging Face tokenizer (tokenizer.json, tokenizer_config.json): the tools count and
# synthesise prompt tokens with it, as nothing can be fetched from a hub here.
TOKENIZER = REALISTIC.path
INPUT_TOKENS, OUTPUT_TOKENS = 128, 32
AT_ONCE = 4
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
TIMED = ("TTFT", "E2E")  # the figures the claim is about, counted against the tolerance

# What `vllm bench serve` imports beyond vllm itself (installed with --no-deps, so that no CUDA wheels come in):
# found by running its argument parser and `main` until no import failed. torch is pinned to 2.13.0 (on our CI-kind
# machines a CPU build lies on disk), though vllm 0.33.0 declares torch==2.14.0 (several GB of CUDA wheels from the
# registry): the bench client does not use torch beyond importing it.
VLLM_LIGHT_DEPS = (
    "aiohttp numpy tqdm regex transformers tokenizers huggingface_hub pillow cachetools psutil sentencepiece msgspec "
    "pydantic pyyaml cbor2 pybase64 pyzmq urllib3 requests openai-harmony openai cloudpickle uvloop py-cpuinfo "
    "prometheus_client xgrammar fastapi partial-json-parser llguidance einops"
).split()
INSTALL = {
    "vllm": [["torch==2.13.0"], ["--no-deps", "vllm==0.33.0"], VLLM_LIGHT_DEPS],
    "guidellm": [["guidellm"]],
    "aiperf": [["aiperf"]],
}
NOT_RUN = {
    "inference-perf": "every release needs Python >= 3.12 (0.7.0 does install into a python3.12 venv), while the other "
    "tools' venvs are 3.11; it is driven by a YAML config and writes a per-request report of its own, which would need "
    "an adapter of its own: not trivial, left out"
}


@dataclass(frozen=True)
class Timed:
    """One request as a tool timed it: figure name -> ms under the tool's definition."""

    key: str | None  # the request id the server logged it under; None: paired by order
    figures: dict[str, float]
    client_only_ms: float | None = None  # time inside its TTFT the server cannot see, where the tool reports it


@dataclass(frozen=True)
class Client:
    """A tool: how to run it, and its figures' definitions with the server's figure converted to each."""

    run: Callable[[str, int, int, Path], list[Timed]]
    server: Callable[[dict[str, Any]], dict[str, float]]
    definitions: dict[str, str]
    notes: str
    env: dict[str, str] = field(default_factory=dict)


def tool_bin(tool: str, name: str) -> str:
    return str(VENVS / tool / "bin" / name)


def call(tool: str, command: list[str], out: Path, env: dict[str, str]) -> None:
    """Run a tool to completion; its chatter goes to a log file beside its results, shown only when it fails."""
    log = out / f"{tool}.log"
    with log.open("wb") as sink:
        done = subprocess.run(command, cwd=out, env={**os.environ, **env}, stdout=sink, stderr=sink, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} exited with {done.returncode}:\n{log.read_text()[-3000:]}")


# --- vLLM: vllm/benchmarks/lib/endpoint_request_func.py (async_request_openai_completions): st = perf_counter()
# before session.post; ttft = first SSE chunk with "choices" - st; latency = the last such chunk - st (the usage chunk
# and [DONE] left out). vllm/benchmarks/serve.py (calculate_metrics): tpot = (latency - ttft) / (output_len - 1),
# output_len from the stream's usage.completion_tokens. Requests carry X-Request-Id = --request-id-prefix + index.
VLLM_SCRIPT = (
    "import argparse, sys\nfrom vllm.benchmarks import serve\n"
    "parser = argparse.ArgumentParser()\nserve.add_cli_args(parser)\nserve.main(parser.parse_args(sys.argv[1:]))\n"
)


def run_vllm(url: str, requests: int, concurrency: int, out: Path) -> list[Timed]:
    # `vllm bench serve` (the CLI) imports the whole engine (uvicorn, ...) before parsing: its module is called
    # directly, with the same arguments, which needs only VLLM_LIGHT_DEPS.
    prefix = f"conf-vllm-{concurrency}-"
    flags = ["--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", MODEL_ID]
    flags += ["--tokenizer", str(TOKENIZER), "--dataset-name", "random", "--random-input-len", str(INPUT_TOKENS)]
    flags += ["--random-output-len", str(OUTPUT_TOKENS), "--ignore-eos", "--num-prompts", str(requests)]
    flags += ["--max-concurrency", str(concurrency), "--request-id-prefix", prefix, "--num-warmups", "0"]
    flags += ["--save-result", "--save-detailed", "--result-dir", str(out), "--result-filename", "vllm.json"]
    call("vllm", [tool_bin("vllm", "python"), "-c", VLLM_SCRIPT, *flags], out, {"HF_HUB_OFFLINE": "1"})
    result = json.loads((out / "vllm.json").read_text())
    timed = []
    columns = zip(result["ttfts"], result["latencies"], result["output_lens"], strict=True)
    for i, (ttft, latency, n) in enumerate(columns):
        figures = {"TTFT": ttft * 1000, "E2E": latency * 1000}
        if n > 1:
            figures["TPOT"] = (latency - ttft) * 1000 / (n - 1)
        timed.append(Timed(f"{prefix}{i}", figures))
    return timed


# --- GuideLLM: guidellm/backends/openai/http.py (_resolve_streaming, _trace_request_start): request_start is set
# when httpx starts writing the request headers (after any connect); first/last_token_iteration = the first and
# last SSE line carrying tokens; request_end after [DONE]. guidellm/schemas/base/request_stats.py:
# time_to_first_token_ms = first_token - request_start; request_latency = request_end - request_start;
# time_per_output_token_ms = (last_token - request_start) / output_tokens (TTFT included);
# inter_token_latency_ms = (last_token - first_token) / (output_tokens - 1); output_tokens from the usage chunk.
def run_guidellm(url: str, requests: int, concurrency: int, out: Path) -> list[Timed]:
    profile = "kind=synchronous" if concurrency == 1 else f"kind=concurrent,streams={concurrency}"
    command = [tool_bin("guidellm", "guidellm"), "run", "--disable-console-interactive"]
    command += ["--backend", f"kind=openai_http,target={url},model={MODEL_ID},request_format=/v1/completions"]
    command += ["--tokenizer", f"kind=hf_auto,model={TOKENIZER}", "--profile", profile]
    command += ["--data", f"kind=synthetic_text,prompt_tokens={INPUT_TOKENS},output_tokens={OUTPUT_TOKENS}"]
    command += ["--constraint", f"kind=max_requests,count={requests}", "--output", f"kind=json,path={out}/gl.json"]
    call("guidellm", command, out, {"HF_HUB_OFFLINE": "1"})
    stats = json.loads((out / "gl.json").read_text())["benchmarks"][0]["requests"]["successful"]
    stats.sort(key=lambda s: s["info"]["timings"]["request_start"])  # the order they were sent in
    timed = []
    for s in stats:
        figures = {
            "TTFT": s["time_to_first_token_ms"],
            "E2E": s["request_latency"] * 1000,
            "TPOT": s["time_per_output_token_ms"],
        }
        if s["inter_token_latency_ms"] is not None:
            figures["ITL"] = s["inter_token_latency_ms"]
        timed.append(Timed(None, figures))  # it sends no request id: paired by order
    return timed


# --- AIPerf: aiperf/transports/aiohttp_client.py: start_perf_ns is taken just before session.request (a connect,
# when the pooled connector opens one, falls inside it); each SSE chunk is stamped on arrival.
# aiperf/metrics/types/ttft_metric.py: TTFT = first content response - start; request_latency_metric.py:
# request_latency = last content response - start (usage-only chunks and [DONE] left out);
# inter_token_latency_metric.py: inter_token_latency = (request_latency - TTFT) / (OSL - first chunk's tokens, or 1)
# = our TPOT; OSL from the server's usage with --use-server-token-count (else AIPerf re-tokenises the text, which
# for this model's random text is off by a token or two). Requests carry X-Request-ID = metadata.x_request_id.
def run_aiperf(url: str, requests: int, concurrency: int, out: Path) -> list[Timed]:
    command = [tool_bin("aiperf", "aiperf"), "profile", "--model", MODEL_ID, "--url", url, "--endpoint-type"]
    command += ["completions", "--streaming", "--tokenizer", str(TOKENIZER), "--isl", str(INPUT_TOKENS)]
    command += ["--prompt-input-tokens-stddev", "0", "--osl", str(OUTPUT_TOKENS), "--extra-inputs", "ignore_eos:true"]
    command += ["--use-server-token-count", "--concurrency", str(concurrency), "--request-count", str(requests)]
    command += ["--artifact-dir", str(out / "aiperf"), "--export-level", "records", "--ui", "none"]
    command += ["--no-gpu-telemetry"]
    # HF_HUB_OFFLINE makes AIPerf look a tokenizer up in the hub cache only, never at a local path: left unset.
    call("aiperf", command, out, {"HF_HUB_OFFLINE": ""})
    timed = []
    for line in (out / "aiperf" / "profile_export.jsonl").read_text().splitlines():
        record = json.loads(line)
        metrics = {name: value["value"] for name, value in record["metrics"].items()}
        figures = {"TTFT": metrics["time_to_first_token"], "E2E": metrics["request_latency"]}
        if "inter_token_latency" in metrics:
            figures["ITL"] = metrics["inter_token_latency"]
        overhead = metrics.get("http_req_connection_overhead")
        timed.append(Timed(record["metadata"]["x_request_id"], figures, overhead))
    return timed


def ours(entry: dict[str, Any]) -> dict[str, float]:
    """The server's figures as it logged them: TTFT and E2E from the first byte it received of the request."""
    return {"TTFT": entry["ttft_ms"], "E2E": entry["e2e_ms"]}


CLIENTS = {
    "vllm": Client(
        run_vllm,
        lambda e: {**ours(e), "TPOT": e["tpot_ms"]},
        {"TTFT": "ttft_ms", "E2E": "e2e_ms", "TPOT": "tpot_ms = (e2e - ttft)/(n - 1)"},
        "its clock starts before `session.post`, so a first request's TCP connect and the body's encoding count "
        "(keep-alive connections after that); E2E ends at the last token chunk; at concurrency > 1 its semaphore "
        "wait is reported apart (client_queue_time), not in these figures",
    ),
    "guidellm": Client(
        run_guidellm,
        lambda e: {**ours(e), "TPOT": e["e2e_ms"] / e["completion_tokens"], "ITL": e["tpot_ms"]},
        {"TTFT": "ttft_ms", "E2E": "e2e_ms", "TPOT": "e2e_ms / n (its TPOT includes TTFT)", "ITL": "tpot_ms"},
        "its clock starts when httpx writes the headers (a connect is outside it); its E2E ends after `[DONE]`, "
        "so it also counts the usage chunk, which the server's e2e (to the last token) does not; its TPOT ends "
        "at the last token; its scheduler and worker processes share the 2 cores with the server",
    ),
    "aiperf": Client(
        run_aiperf,
        lambda e: {**ours(e), "ITL": e["tpot_ms"]},
        {"TTFT": "ttft_ms", "E2E": "e2e_ms", "ITL": "tpot_ms (its inter_token_latency = (e2e - ttft)/(n - 1))"},
        "its clock starts before `session.request`, so a TCP connect the pooled connector makes counts "
        "(client_only_ms: its own http_req_connection_overhead); TTFT and E2E count only chunks whose text is not "
        "empty (aiperf/common/models/record_models.py, content_responses), so a token streamed with empty text "
        "first or last moves its figure and not the server's; n from the server's usage (--use-server-token-count)",
    ),
}


def access_lines(log: Path, offset: int) -> list[dict[str, Any]]:
    """The generation requests the server logged after byte ``offset``, in the order they finished."""
    lines = log.read_bytes()[offset:].decode().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    return [
        e
        for e in entries
        if e.get("logger") == "genai_server.access" and e.get("path") in GENERATION_PATHS and "ttft_ms" in e
    ]


def pair(timed: list[Timed], logged: list[dict[str, Any]]) -> list[tuple[Timed, dict[str, Any]]]:
    """Each timed request with its log line: by id where the tool sent one, else by order (concurrency 1 only)."""
    if all(t.key is not None for t in timed):
        by_id = {e["request_id"]: e for e in logged}
        missing = [t.key for t in timed if t.key not in by_id]
        if missing:
            raise RuntimeError(f"{len(missing)} requests not in the access log, e.g. {missing[0]}")
        return [(t, by_id[str(t.key)]) for t in timed]
    if len(timed) != len(logged):
        raise RuntimeError(f"{len(timed)} timed requests, {len(logged)} logged: cannot pair by order")
    return list(zip(timed, logged, strict=True))


def within(server: float, client: float) -> bool:
    return abs(server - client) <= max(2.0, 0.05 * client)


def compare(client: Client, pairs: list[tuple[Timed, dict[str, Any]]]) -> dict[str, Any]:
    """Per figure: median ratio server/client, the worst difference (server - client), agreement within tolerance."""
    figures: dict[str, Any] = {}
    for name, definition in client.definitions.items():
        both = [(client.server(e)[name], t.figures[name]) for t, e in pairs if name in t.figures]
        diffs = [s - c for s, c in both]
        worst: float = max(diffs, key=abs)
        row: dict[str, Any] = {
            "server_figure": definition,
            "requests": len(both),
            "median_ratio": round(statistics.median(s / c for s, c in both), 4),
            "worst_diff_ms": round(worst, 2),
            "median_diff_ms": round(statistics.median(diffs), 2),
            "median_client_ms": round(statistics.median(c for _, c in both), 2),
        }
        if name in TIMED:
            row["within"] = sum(within(s, c) for s, c in both)
        figures[name] = row
    overheads = [t.client_only_ms for t, _ in pairs if t.client_only_ms is not None]
    median_overhead = round(statistics.median(overheads), 2) if overheads else None
    return {"figures": figures, "client_only_ms_median": median_overhead, "per_request": per_request(client, pairs)}


def per_request(client: Client, pairs: list[tuple[Timed, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Both sides of every request, so that an outlier can be looked into after the run (the logs are temporary)."""
    return [
        {
            "request_id": e["request_id"],
            "client": {name: round(value, 2) for name, value in t.figures.items()},
            "server": {name: round(value, 2) for name, value in client.server(e).items()},
            "server_queue_ms": e["queue_time_ms"],
            "server_duration_ms": e["duration_ms"],
            "completion_tokens": e["completion_tokens"],
            "client_only_ms": t.client_only_ms,
        }
        for t, e in pairs
    ]


def compare_medians(client: Client, timed: list[Timed], logged: list[dict[str, Any]]) -> dict[str, Any]:
    """At concurrency > 1 requests finish out of order (and GuideLLM sends no id): medians of each side only."""
    out = {}
    for name in client.definitions:
        clients = [t.figures[name] for t in timed if name in t.figures]
        servers = [client.server(e)[name] for e in logged]
        out[name] = {
            "median_client_ms": round(statistics.median(clients), 2),
            "median_server_ms": round(statistics.median(servers), 2),
            "ratio_of_medians": round(statistics.median(servers) / statistics.median(clients), 4),
        }
    return {"figures": out, "requests": len(timed), "logged": len(logged)}


def measure(tool: str, url: str, log: Path, requests: int, concurrency: int, folder: Path) -> dict[str, Any]:
    """One tool run against one target; its requests set beside the lines the server logged during it."""
    client = CLIENTS[tool]
    out = Path(tempfile.mkdtemp(prefix=f"{tool}-c{concurrency}-", dir=folder))
    offset = log.stat().st_size
    started = time.perf_counter()
    try:
        timed = client.run(url, requests, concurrency, out)
        time.sleep(0.5)  # the access line follows the response's last byte: let the server write the last one
        logged = access_lines(log, offset)
        if concurrency == 1:
            return {**compare(client, pair(timed, logged)), "wall_s": round(time.perf_counter() - started, 1)}
        return {**compare_medians(client, timed, logged), "wall_s": round(time.perf_counter() - started, 1)}
    except (RuntimeError, OSError, KeyError, ValueError, subprocess.TimeoutExpired) as error:
        return {"error": str(error)[-1500:]}


def serve(*args: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A server writing its JSON log (access lines at INFO) to ``log``; start() passes --log-level WARNING first,
    and the later flag wins."""
    with log.open("wb") as sink:
        return start(*args, "--model-id", MODEL_ID, "--log-level", "INFO", "--log-format", "json", output=sink.fileno())


async def ready(*urls: str) -> None:
    async with aiohttp.ClientSession() as session:
        for url in urls:
            await wait_ready(session, url, timeout_s=300)


def run_all(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    ensure_model(REALISTIC)
    engine_log, gateway_log = folder / "embedded.log", folder / "gateway.log"
    engine, engine_url = serve("--model-path", str(REALISTIC.path), log=engine_log)
    gateway, gateway_url = serve("--backend", "openai", "--upstream-url", f"{engine_url}/v1", log=gateway_log)
    targets = {"embedded": (engine_url, engine_log), "gateway": (gateway_url, gateway_log)}
    results: dict[str, Any] = {}
    try:
        asyncio.run(ready(engine_url, gateway_url))
        for target, (url, log) in targets.items():
            for tool in args.tools:
                for concurrency, requests in ((1, args.requests), (AT_ONCE, args.concurrent_requests)):
                    if requests == 0:
                        continue
                    result = measure(tool, url, log, requests, concurrency, folder)
                    results.setdefault(tool, {}).setdefault(target, {})[f"concurrency {concurrency}"] = result
                    print(tool, target, concurrency, json.dumps(result), flush=True)
    finally:
        for proc in (gateway, engine):
            proc.terminate()
            proc.wait()
    return results


def install(tools: list[str]) -> None:
    """A venv per tool under .cache/conformance (this Python's), as the suite expects them; one already there is
    kept."""
    for tool in tools:
        venv = VENVS / tool
        if (venv / "bin" / "python").exists():
            continue
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for packages in INSTALL[tool]:
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *packages], check=True)


def cell(row: dict[str, Any], name: str) -> str:
    if name not in row:
        return "—"
    return f"{row[name]} / {row['requests']}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Latency conformance: the server's own figures against benchmark clients'",
        "",
        f"The realistic model ({INPUT_TOKENS} prompt tokens, {OUTPUT_TOKENS} generated with `ignore_eos`, streamed "
        f"`/v1/completions`), {report['requests']} requests one at a time per tool and target; the embedded server, "
        "and a gateway (`BACKEND=openai`) in front of it whose access log is the server side. Ratio: the median "
        "over requests of server/client, each figure under the tool's own definition (the server's converted to it: "
        "column 'server figure'); worst: the largest server - client difference; within: requests that agree within "
        f"max(2 ms, 5 %). The run took {report['wall_s']:.0f} s. `python benchmarks/conformance.py`",
        "",
        "| tool | target | figure | server figure | ratio | median diff | worst diff | within |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    medians = []
    for tool, targets in report["tools"].items():
        for target, runs in targets.items():
            one = runs.get("concurrency 1", {})
            if "error" in one:
                lines.append(f"| {tool} | {target} | failed: {one['error'].splitlines()[0][:120]} | | | | | |")
            for name, row in one.get("figures", {}).items():
                lines.append(
                    f"| {tool} | {target} | {name} | {row['server_figure']} | {row['median_ratio']} "
                    f"| {row['median_diff_ms']} ms | {row['worst_diff_ms']} ms | {cell(row, 'within')} |"
                )
            many = runs.get(f"concurrency {AT_ONCE}", {})
            for name, row in many.get("figures", {}).items():
                medians.append(
                    f"| {tool} | {target} | {name} | {row['median_client_ms']} ms | {row['median_server_ms']} ms "
                    f"| {row['ratio_of_medians']} |"
                )
            if "error" in many:
                medians.append(f"| {tool} | {target} | failed: {many['error'].splitlines()[0][:120]} | | | |")
    lines += ["", f"At concurrency {AT_ONCE} ({report['concurrent_requests']} requests; medians only):", ""]
    lines += [
        "| tool | target | figure | client median | server median | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += medians
    lines += ["", "What each tool counts that the server cannot see:", ""]
    lines += [f"- {tool}: {CLIENTS[tool].notes}." for tool in report["tools"]]
    lines += [f"- {tool}: not run: {why}." for tool, why in NOT_RUN.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install", action="store_true", help="create the tools' venvs first (kept when there)")
    parser.add_argument("--requests", type=int, default=20, help="per tool and target, one at a time")
    parser.add_argument("--concurrent-requests", type=int, default=16, help=f"at concurrency {AT_ONCE}; 0: none")
    parser.add_argument("--tools", type=lambda s: s.split(","), default=list(CLIENTS))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args()
    if args.install:
        install(args.tools)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="conformance-") as folder:
        tools = run_all(args, Path(folder))
    report = {
        "requests": args.requests,
        "concurrent_requests": args.concurrent_requests,
        "input_tokens": INPUT_TOKENS,
        "output_tokens": OUTPUT_TOKENS,
        "wall_s": round(time.perf_counter() - started, 1),
        "tools": tools,
        "not_run": NOT_RUN,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conformance.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "conformance.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
