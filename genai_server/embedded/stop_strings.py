"""Stop sequences, applied by the server: the CPU engine cannot (it needs dynamic batching)."""

from __future__ import annotations


class StopMatcher:
    """Finds the first stop sequence in streamed text and holds back text that may begin one.

    Text is released as soon as it can no longer be the start of a stop
    sequence, so a streaming client never sees part of the stop text.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add generated text; return (text safe to emit, whether a stop sequence was hit)."""
        self._buffer += text
        hits = [i for i in (self._buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            emit, self._buffer = self._buffer[: min(hits)], ""
            return emit, True
        cut = len(self._buffer) - self._partial_match_length()
        emit, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return emit, False

    def _partial_match_length(self) -> int:
        """Length of the longest end of the buffer that is the beginning of a stop sequence."""
        for n in range(min(self._hold, len(self._buffer)), 0, -1):
            tail = self._buffer[-n:]
            if any(stop.startswith(tail) for stop in self._stops):
                return n
        return 0

    def flush(self) -> str:
        """The held-back text, once generation ended without a stop sequence."""
        rest, self._buffer = self._buffer, ""
        return rest
