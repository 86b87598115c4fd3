"""DNS rebinding: a page on any origin can point a name of its own at 127.0.0.1 and have the browser send it
requests, which reach a server on loopback as if from that origin. With no API keys and CORS ``*`` (the
defaults), such a page reads completions. A server bound to loopback therefore answers only requests whose
``Host`` is a loopback name or address, or one named in ``ALLOWED_HOSTS`` (as Ollama does); a server bound to
another address is reached by whatever name points at it, and is not checked (put API keys or a proxy in front).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from genai_server.errors import Forbidden


def setup_host_check(app: web.Application, server_host: str, allowed: Iterable[str]) -> None:
    """Refuse (403) a request whose ``Host`` is not a loopback name or in ``allowed``, when bound to loopback."""
    if not is_loopback(server_host):
        return
    # Written as a Host header may be: "proxy.example:8443" and "[fe80::1]" name the hosts they hold.
    names = frozenset(_host_name(name.strip()).lower() for name in allowed)

    @web.middleware
    async def host_check(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get(hdrs.HOST, "")
        host = _host_name(header).lower()
        # No Host at all (an HTTP/1.0 health check) cannot come from a browser, which always sends one.
        if header and not is_loopback(host) and host not in names:
            shown = host[:100].encode("ascii", "backslashreplace").decode()
            raise Forbidden(
                f"Host '{shown}' is not this server's name: a server on loopback answers localhost only "
                "(ALLOWED_HOSTS adds names)"
            )
        return await handler(request)

    app.middlewares.append(host_check)


def is_loopback(host: str) -> bool:
    """``localhost`` (and its subdomains), or an address of the loopback network."""
    name = host.lower().rstrip(".").strip("[]")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8000`` -> ``::1``); empty if it has none."""
    try:
        return (urlsplit(f"//{header}").hostname or "").rstrip(".")
    except ValueError:
        return ""
