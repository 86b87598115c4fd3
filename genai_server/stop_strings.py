"""Stop sequences, applied by the server: the CPU engine cannot (it needs dynamic batching)."""

from __future__ import annotations


class StopMatcher:
    """Finds the first stop sequence in streamed text and holds back text that may begin one.

    Text is released only once it can no longer be the start of a stop
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
        cut = max(len(self._buffer) - self._hold, 0)
        emit, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return emit, False

    def flush(self) -> str:
        """The held-back text, once generation ended without a stop sequence."""
        rest, self._buffer = self._buffer, ""
        return rest
