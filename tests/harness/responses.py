"""Readers of what the server answers: SSE streams, the Prometheus exposition, greedy text compared across runs."""

from __future__ import annotations

import json
from typing import Any


def sse_events(raw: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    events = [block.strip() for block in raw.split("\n\n") if block.strip()]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: ") :] for e in events]


def stream_chunks(raw: str) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE body, checking it ends with exactly one ``[DONE]``."""
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    return [json.loads(e) for e in events[:-1]]


def named_events(raw: str) -> list[dict[str, Any]]:
    """The JSON events of a stream of named events (the Responses and Messages APIs): each an ``event:`` line naming
    its payload's ``type``, then one ``data:`` line; keep-alive comments skipped; no ``[DONE]``."""
    events = []
    for block in (b.strip() for b in raw.split("\n\n")):
        if not block or block.startswith(":"):
            continue
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        event = json.loads(data[len("data: ") :])
        assert event["type"] == name[len("event: ") :], block
        events.append(event)
    return events


def metric_sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in the exposition text."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(part in line for part in wanted.split(",")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels}")


def assert_same_greedy_text(got: str, expected: str) -> None:
    """Greedy text of a sequence run batched against the same sequence run otherwise (alone, or in a batch
    whose mate was cancelled). Batched arithmetic can flip a late near-tie on some x86-64 CPUs (measured on an
    AMD EPYC: 300-token sequences identical for their first ~700 characters, then not), so what holds on any
    box is a long identical beginning, not the last characters."""
    keep = len(expected) // 2
    assert len(got) >= keep, (got, expected)
    assert got[:keep] == expected[:keep], (got, expected)
