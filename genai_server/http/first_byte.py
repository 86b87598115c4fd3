"""When each request began to arrive: the kernel's receive stamp of the first bytes the server read of it.

A request's clock (queue time, TTFT, e2e) starts there, so that it counts what its client already waits for. aiohttp
stamps nothing before it has parsed a request's headers, and even its first look at the bytes comes only when the
event loop gets round to reading the socket: under load a request sat in the socket's buffer for up to 0.6 s
before any of our code saw it, and the server's TTFT came out 3-4 ms under the client's even when idle.

So the server listens on sockets of its own (``listening_sockets``, handed to ``web.run_app``) whose connections
read a request's first bytes with ``recvmsg`` and ask the kernel for their receive timestamp (``SO_TIMESTAMPING``,
software receive stamps, Linux): the moment the last segment of that first read was received. That moment is
kept on the connection, where the request-record middleware reads it (``FirstBytes.arrival``), until the request
ends (``FirstBytes.request_ended``), when the connection starts waiting for its next request's first byte. Where the
kernel gives no stamp (another OS), the time of that first read stands in: still before aiohttp parses anything.

Only the first read of each request pays for ``recvmsg``; every other read is the plain ``recv`` asyncio makes.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import sys
import time
import weakref
from typing import Any

from aiohttp import web

# Linux's SO_TIMESTAMPING (its SCM_TIMESTAMPING control message has the same number) and the flags that ask for
# software stamps of received data and their report: SOF_TIMESTAMPING_RX_SOFTWARE | SOF_TIMESTAMPING_SOFTWARE.
_SO_TIMESTAMPING = 37
_RX_SOFTWARE_STAMPS = (1 << 3) | (1 << 4)
# The control message holds three timespecs (software, deprecated, hardware); the first is the software stamp.
_TIMESPEC = struct.Struct("@ll")  # struct timespec of the old SO_TIMESTAMPING: two C longs
_ANCILLARY_SPACE = socket.CMSG_SPACE(3 * _TIMESPEC.size)
# What asyncio's server passes over too when binding every address of a host: a family the machine lacks, an
# address it cannot bind.
_PASSED_OVER = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL})
# A stamp further than this from now is a wall clock that jumped, not a request's arrival: the read's time is used.
_MOST_BELIEVABLE_AGE_S = 3600.0
_AddressInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]


class _Connection(socket.socket):
    """An accepted connection whose first read of each request notes when that request's first byte arrived."""

    first_byte: float | None = None  # perf_counter() time; None until the current request's first read

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.first_byte is not None:
            return super().recv(bufsize, flags)
        data, ancillary, _, _ = self.recvmsg(bufsize, _ANCILLARY_SPACE, flags)
        if data:
            self.first_byte = _arrival(ancillary)
        return data


class _Listening(socket.socket):
    """A listening socket whose accepted connections are ``_Connection``s, each noted in ``connections``."""

    def __init__(self, address: _AddressInfo, connections: weakref.WeakValueDictionary[int, _Connection]) -> None:
        family, kind, proto, _, _ = address
        super().__init__(family, kind, proto)
        self.connections = connections

    def accept(self) -> tuple[socket.socket, object]:
        fd, address = self._accept()  # type: ignore[attr-defined]  # socket.socket's own first half of accept
        connection = _Connection(self.family, self.type, self.proto, fileno=fd)
        _ask_for_stamps(connection)
        self.connections[fd] = connection
        return connection, address


class FirstBytes:
    """The server's listening sockets and the first-byte times of the requests on their connections."""

    def __init__(self) -> None:
        self._connections: weakref.WeakValueDictionary[int, _Connection] = weakref.WeakValueDictionary()

    def listening_sockets(self, host: str, port: int) -> list[socket.socket]:
        """Sockets bound to every address ``host`` names, not yet listening: aiohttp starts listening once the app
        has started, so that a connection made while models load is refused, not left waiting. As asyncio's own
        server does, an address family this machine lacks (IPv6 turned off) or an address it cannot bind is passed
        over while another binds."""
        bound: list[socket.socket] = []
        passed_over: OSError | None = None
        try:
            for address in _addresses(host, port):
                try:
                    bound.append(self._bound(address))
                except OSError as exc:
                    if exc.errno not in _PASSED_OVER:
                        raise
                    passed_over = exc
        except OSError:
            for opened in bound:
                opened.close()
            raise
        if not bound:
            raise passed_over or OSError(errno.EADDRNOTAVAIL, f"{host!r} names no address to listen on")
        return bound

    def _bound(self, address: _AddressInfo) -> socket.socket:
        sock = _Listening(address, self._connections)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sock.family == socket.AF_INET6:  # "::" means IPv6 alone, as asyncio binds it
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address[4])
        except OSError:
            sock.close()
            raise
        # Linux turns receive stamping on for the whole machine a moment after the first socket asks, and off a
        # moment after the last one stops: asked for here, for as long as the server listens, the first segment of
        # every connection is stamped.
        _ask_for_stamps(sock)
        return sock

    def arrival(self, request: web.Request) -> float | None:
        """When ``request`` began to arrive (perf_counter), if it came through one of our sockets."""
        connection = self._connection(request)
        return None if connection is None else connection.first_byte

    def request_ended(self, request: web.Request) -> None:
        """``request`` has ended: its connection's next read is the first of its next request. A body left unread
        (a request refused before it was read) is still read by aiohttp after the response, and would stamp the
        connection: the stamp is cleared again once that body has ended."""
        connection = self._connection(request)
        if connection is None:
            return
        connection.first_byte = None
        if not request.content.is_eof():
            request.content.on_eof(lambda: setattr(connection, "first_byte", None))

    def _connection(self, request: web.Request) -> _Connection | None:
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        return None if sock is None else self._connections.get(sock.fileno())


def _ask_for_stamps(sock: socket.socket) -> None:
    if sys.platform == "linux":
        with contextlib.suppress(OSError):  # a kernel without it: the first read's time stands in
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPING, _RX_SOFTWARE_STAMPS)


def _addresses(host: str, port: int) -> list[_AddressInfo]:
    """Every address ``host`` names, once each (getaddrinfo may repeat one)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return list(dict.fromkeys(infos))


def _arrival(ancillary: list[tuple[int, int, bytes]]) -> float:
    """The kernel's receive stamp of a read (wall clock), as a perf_counter() time; the read's own time without."""
    now, wall = time.perf_counter(), time.time()
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPING and len(data) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(data)
            age: float = wall - (seconds + nanoseconds / 1e9)
            if 0 <= age < _MOST_BELIEVABLE_AGE_S:
                return now - age
    return now
