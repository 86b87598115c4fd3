"""The target of each figure of the performance benchmark, and whether a measured value meets it.

Both run.py (which prints the ratios) and report.py (which marks misses in the table) judge figures against these;
report.py used to import them from run.py, which imports report.py: a circle. Here they depend on nothing.
"""

from __future__ import annotations

TARGETS = {  # figure: (target, higher is better)
    "single_stream_vs_bare": (0.95, True),
    "x4_vs_1": (2.5, True),
    "x8_vs_1": (3.0, True),
    "loop_lateness_p99_ms": (5.0, False),
    "health_p99_ms": (10.0, False),
    "ttft_loaded_vs_idle_p50": (3.0, False),
    "rss_vs_bare": (1.3, False),
    "ready_vs_bare_load": (1.5, False),
}


def meets(name: str, value: float) -> bool:
    """Whether ``value`` of figure ``name`` is on the good side of its target (the target itself counts)."""
    target, higher = TARGETS[name]
    return value >= target if higher else value <= target


# Against llama-server on the same weights (vs_llama_cpp.py): genai_server / llama-server for each figure.
VERSUS_TARGETS = {
    "tokens_per_s_1": (1.1, True),
    "tokens_per_s_4": (1.1, True),
    "tokens_per_s_8": (1.1, True),
    "prefill_tokens_per_s": (1.1, True),
    "ttft_long_prompt_ms": (0.9, False),
    "peak_rss_mb_8": (1.0, False),
}
# The server against the bare engine on the same figures, measured in turn with it: our own share.
SERVER_VS_ENGINE_TARGET = 0.95


def mark(ok: bool) -> str:
    """The sign a report puts after a figure that misses its target."""
    return "" if ok else " ✗"
