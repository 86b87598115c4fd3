"""Writes a benchmark run as JSON, a Markdown table and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from load import median
from targets import mark, meets

LABELS = {
    "single_stream_vs_bare": ("single stream via HTTP/SSE vs bare in-process loop, tokens/s", "{:.2f}x", ">= 0.95x"),
    "x4_vs_1": ("4 concurrent streams, aggregate tokens/s vs 1 stream", "{:.2f}x", ">= 2.5x"),
    "x8_vs_1": ("8 concurrent streams, aggregate tokens/s vs 1 stream", "{:.2f}x", ">= 3x"),
    "loop_lateness_p99_ms": ("event-loop lateness while 4 streams generate, p99", "{:.2f} ms", "<= 5 ms"),
    "health_p99_ms": ("/health latency while 4 streams generate, p99", "{:.2f} ms", "<= 10 ms"),
    "ttft_loaded_vs_idle_p50": ("TTFT arriving while 3 others stream vs idle, p50", "{:.2f}x", "<= 3x"),
    "rss_vs_bare": ("server RSS vs bare process holding the model", "{:.2f}x", "<= 1.3x"),
    "ready_vs_bare_load": ("start to ready vs bare model load (both from process spawn)", "{:.2f}x", "<= 1.5x"),
}


def markdown(results: dict[str, Any]) -> str:
    """The target table per model and config, then latency per concurrency level."""
    lines = [
        f"Profile `{results['profile']}`, {results['machine']['cpus']} CPUs, Python {results['machine']['python']}.",
        "",
    ]
    models = results["models"]
    columns = [(m, c) for m in models for c in models[m]["configs"]]
    lines.append("| figure | target | " + " | ".join(f"{m} ({c})" for m, c in columns) + " |")
    lines.append("| --- | --- |" + " --- |" * len(columns))
    for key, (label, fmt, target) in LABELS.items():
        cells = []
        for m, c in columns:
            value = models[m]["configs"][c]["ratios"][key]
            cells.append(fmt.format(value) + mark(meets(key, value)))
        lines.append(f"| {label} | {target} | " + " | ".join(cells) + " |")
    lines.append("")
    bandwidth = results["read_bandwidth_gb_s"]
    lines.append(f"Measured memory read bandwidth: {bandwidth:.1f} GB/s.")
    lines.append("")
    for m, entry in models.items():
        weights = entry["weight_bytes_per_token"]
        bound = bandwidth * 1e9 / weights
        first = next(iter(entry["configs"].values()))
        bare_tps = median(first["bare"]["tokens_per_s"])
        lines.append(
            f"**{m} model**, {entry['tokens_per_request']} tokens per request. A decode step reads "
            f"{weights / 1e6:.0f} MB of weights, so one stream is bound to {bound:.0f} tok/s by memory "
            f"bandwidth; the bare loop reaches {bare_tps:.0f} tok/s ({bare_tps / bound:.0%} of the bound, "
            f"prefill included)."
        )
        lines.append("")
        for c, run in entry["configs"].items():
            bare, server = run["bare"], run["server"]
            lines.append(
                f"Engine `{c}` (batch x lanes): single stream bare {median(bare['tokens_per_s']):.1f} tok/s vs "
                f"server {median(server['tokens_per_s']):.1f} tok/s (medians of alternating runs); RSS bare "
                f"{bare['rss_mb']:.0f} MiB vs server {server['rss_mb']:.0f} MiB (peak under load "
                f"{server['rss_peak_mb']:.0f} MiB); ready bare {bare['ready_s']:.2f} s vs server "
                f"{server['ready_s']:.2f} s; TTFT idle p50 {median(server['ttft_idle_ms']):.0f} ms vs loaded "
                f"{median(server['ttft_loaded_ms']):.0f} ms; /health p50 {server['health_p50_ms']:.2f} ms."
            )
            lines.append("")
            lines.append("| concurrency | tokens/s | vs 1 | TTFT p50 | TTFT p95 | TPOT p50 | TPOT p95 |")
            lines.append("| --- | --- | --- | --- | --- | --- | --- |")
            base = server["levels"][0]["tokens_per_s"]
            for lv in server["levels"]:
                lines.append(
                    f"| {lv['concurrency']} | {lv['tokens_per_s']:.1f} | {lv['tokens_per_s'] / base:.2f}x | "
                    f"{lv['ttft_p50_ms']:.1f} ms | {lv['ttft_p95_ms']:.1f} ms | {lv['tpot_p50_ms']:.2f} ms | "
                    f"{lv['tpot_p95_ms']:.2f} ms |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out: Path) -> None:
    """throughput.png and latency.png against concurrency. One colour per engine config, shared by everything of
    that config's run (its server line, its bare-engine baseline, its p50 and p95); the baseline is the bare engine
    at one stream, so it is drawn as that: a hollow square at x=1, and the 1-stream ratio is in the legend. Every
    axis starts at 0, so a gap looks as big as it is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]  # the default cycle, one per config
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, (m, entry) in zip(axes[0], models.items(), strict=True):
        for colour, (c, run) in zip(colours, entry["configs"].items(), strict=False):
            _throughput(ax, c, run, colour)
        ax.set(title=f"{m} model: aggregate throughput", xlabel="concurrent streams", ylabel="tokens/s")
        _axes_from_zero(ax)
        ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 7), squeeze=False)
    for col, (m, entry) in enumerate(models.items()):
        for colour, (c, run) in zip(colours, entry["configs"].items(), strict=False):
            levels = run["server"]["levels"]
            xs = [lv["concurrency"] for lv in levels]
            for row, metric in enumerate(("ttft", "tpot")):
                for q, style in (("p50", "o-"), ("p95", "x--")):
                    ys = [lv[f"{metric}_{q}_ms"] for lv in levels]
                    axes[row][col].plot(xs, ys, style, color=colour, label=f"engine {c}, {q}")
        for row, metric in enumerate(("TTFT", "TPOT")):
            ax = axes[row][col]
            ax.set(title=f"{m} model: {metric} (solid p50, dashed p95)", xlabel="concurrent streams", ylabel="ms")
            _axes_from_zero(ax)
            ax.legend(fontsize="small", ncols=2)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=100)
    plt.close(fig)


def _throughput(ax: Any, config: str, run: dict[str, Any], colour: Any) -> None:
    """One config's server line and its own bare-engine baseline (one stream), in one colour; the 1-stream ratio
    goes in the legend rather than on the crowded point."""
    levels = run["server"]["levels"]
    bare = median(run["bare"]["tokens_per_s"])
    one = next(lv["tokens_per_s"] for lv in levels if lv["concurrency"] == 1)
    ax.plot(
        [lv["concurrency"] for lv in levels],
        [lv["tokens_per_s"] for lv in levels],
        "o-",
        color=colour,
        label=f"server, engine {config} (1 stream: {one / bare:.2f}x bare)",
    )
    ax.plot(
        [1],
        [bare],
        "s",
        color=colour,
        markerfacecolor="none",
        markersize=10,
        label=f"bare engine, 1 stream ({config} run)",
    )


def _axes_from_zero(ax: Any) -> None:
    ax.set_xlim(0, 8.5)
    ax.set_ylim(bottom=0)
    ax.set_xticks([1, 2, 4, 8])


def yardsticks_markdown(results: dict[str, Any]) -> str:
    """The llama.cpp comparison and the chat-turn figures, when the run has them."""
    import chat_turns
    import vs_llama_cpp

    parts = []
    versus = results.get("vs_llama_cpp")
    if versus:
        parts.append(vs_llama_cpp.markdown(versus["model"], versus["figures"], versus["ratios"]))
    chats = results.get("chat_turns")
    if chats:
        parts.append(chat_turns.markdown(chats["model"], chats["figures"], chats["reply_tokens"]))
    return "\n".join(parts)


def yardstick_plots(results: dict[str, Any], out: Path) -> None:
    """vs-llama-cpp.png (ratios to llama-server, the engine alone's beside ours) and chat-turns.png (TTFT by turn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versus = results.get("vs_llama_cpp")
    if versus:
        keys = [k for k in versus["ratios"] if k.startswith(("tokens_per_s", "prefill"))]
        alone = versus["limits"]
        fig, ax = plt.subplots(figsize=(8, 4))
        xs = range(len(keys))
        ax.bar([x - 0.2 for x in xs], [versus["ratios"][k] for k in keys], 0.4, label="genai_server")
        ax.bar([x + 0.2 for x in xs], [alone[k]["engine_vs_llama_server"] for k in keys], 0.4, label="engine alone")
        ax.axhline(1.0, color="grey", linestyle="--", label="llama-server")
        ax.set_xticks(list(xs), [k.replace("tokens_per_s_", "decode, streams: ") for k in keys])
        ax.set(title=f"vs llama-server, same weights ({versus['model']} model)", ylabel="ratio (higher is better)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "vs-llama-cpp.png", dpi=100)
        plt.close(fig)
    chats = results.get("chat_turns")
    if chats:
        fig, ax = plt.subplots(figsize=(8, 4))
        for name, figures in chats["figures"].items():
            turns = figures["ttft_ms_by_turn"]
            ax.plot(range(1, len(turns) + 1), turns, "o-", label=name)
        ax.set(
            title=f"Chat turns, ~2000-token history ({chats['model']} model)",
            xlabel="turn",
            ylabel="time to first token, ms (log)",
            yscale="log",
            xticks=[1, 2, 3, 4, 5],
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "chat-turns.png", dpi=100)
        plt.close(fig)


def write_report(results: dict[str, Any], out: Path) -> None:
    """results.json, results.md and the plots in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n" + yardsticks_markdown(results))
    plots(results, out)
    yardstick_plots(results, out)
