"""Keep ONNX Runtime's usage telemetry off: prompts and keys never leave the box, nor does anything else.

The official onnxruntime-genai wheels collect usage events by default (their docs/Privacy.md), and the Linux 0.18
wheel carries the upload endpoint. Measured with a fresh ``HOME``: loading a model and generating leaves
``~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid, onnxruntime-genai.db, onnxruntime.db}`` (a device id and
an event store, for ONNX Runtime and GenAI both). ``og.disable_telemetry_events()`` alone still leaves all three;
``ORT_DISABLE_TELEMETRY=1`` in the environment before the first model loads leaves none, so both are done.
(Where the runtime sees a CI runner's variable, ``CI=true``, ``GITHUB_ACTIONS`` and the like, it keeps no store of
its own accord; a user's box has none of them.)
"""

from __future__ import annotations

import functools
import logging
import os

import onnxruntime_genai as og

log = logging.getLogger(__name__)


@functools.cache  # once per process
def turn_off() -> None:
    """Before the first model loads: no device id, no event store, no upload."""
    # Read by the runtime when its telemetry starts (at the first model), not at import, so setting it here works.
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    og.disable_telemetry_events()
    log.info("ONNX Runtime telemetry is off (ORT_DISABLE_TELEMETRY=1)")
