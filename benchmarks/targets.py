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
