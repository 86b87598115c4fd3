"""Frames on the pipes between the server and its engine process: a 4-byte length, then a pickled list of messages.

Pickle is safe here because both ends are this package, started by the server: a client's text travels inside the
values (prompts are token ids, options a dataclass), never as pickled bytes of its own making. One frame carries
every message of a round, so a decode step of eight sequences costs one write and one read, not eight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import struct
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
Message = tuple[Any, ...]


def encode(messages: list[Message]) -> bytes:
    """One frame holding ``messages``."""
    data = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


class FrameReader(asyncio.Protocol):
    """The server's end of the event pipe: each whole frame's messages go to ``on_messages`` as soon as its last
    byte arrives, in the event loop's own callback (no task to wake per frame: a token's frame is on the hot path),
    and ``on_end`` is called once when the pipe closes. A frame that cannot be read means the other side can no
    longer be understood: ``on_error`` (which stops it) is called, and nothing more is read."""

    def __init__(
        self,
        on_messages: Callable[[list[Message]], None],
        on_end: Callable[[], None],
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_messages = on_messages
        self._on_end = on_end
        self._on_error = on_error
        self._buffer = bytearray()
        self._broken = False

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            size = _HEADER.unpack_from(self._buffer)[0]
            end = _HEADER.size + size
            if len(self._buffer) < end:
                return
            try:
                messages: list[Message] = pickle.loads(self._buffer[_HEADER.size : end])
            except Exception:
                log.exception("a frame from the engine process could not be read")
                self._broken = True
                self._buffer.clear()
                self._on_error()
                return
            del self._buffer[:end]
            self._on_messages(messages)

    def eof_received(self) -> bool | None:
        return None  # the transport closes, and connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_end()


def read_blocking(stream: BinaryIO) -> list[Message] | None:
    """``read`` for a thread that may block: the engine process's command reader."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    if len(data) < size:
        return None
    messages: list[Message] = pickle.loads(data)
    return messages


class BlockingWriter:
    """Frames written whole from any thread of the engine process (a lock keeps two frames from interleaving).
    A write blocks while the server is slow to read: the engine then waits, which is what backpressure means."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, *messages: Message) -> None:
        """Write one frame of ``messages``; an error means the server has gone (the caller's process ends)."""
        self._write(encode(list(messages)))

    def send_current(self, make: Callable[[], list[Message]]) -> None:
        """Write the frame of messages ``make`` builds while no other frame can be written: a snapshot in it (the
        gauges) is never overtaken by an older one."""
        with self._lock:
            self._write_locked(encode(make()))

    def _write(self, frame: bytes) -> None:
        with self._lock:
            self._write_locked(frame)

    def _write_locked(self, frame: bytes) -> None:
        data = memoryview(frame)
        while data:
            data = data[os.write(self._fd, data) :]
