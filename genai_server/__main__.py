"""``genai-server`` / ``python -m genai_server``: read settings, load the model, serve until stopped."""

from __future__ import annotations

import errno
import logging
import resource
import signal
import sys

from aiohttp import web

from genai_server.app import create_app
from genai_server.errors import ModelLoadingFailed, UpstreamUnavailableAtStart
from genai_server.exit_status import ExitStatus
from genai_server.http.first_byte import FirstBytes
from genai_server.http.lifecycle import STATE, STOP_MARGIN_S, announce_listening, log_stop_signals
from genai_server.logs import setup_logging
from genai_server.settings import Settings, SettingsError, load_settings

log = logging.getLogger("genai_server")

# A port that cannot be bound: someone else has it, it needs privileges, or the address is not this machine's (or
# of a family it lacks).
_LISTEN_ERRORS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT})
_MOST_OPEN_FILES = 65536


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; the exit status says why it ended (``ExitStatus``)."""
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"genai-server: {exc}", file=sys.stderr)
        return ExitStatus.BAD_SETTING
    setup_logging(settings.log_level, settings.log_format)
    _raise_open_file_limit()
    first_bytes = FirstBytes()
    app = create_app(settings, first_bytes=first_bytes)
    # A failed engine stops the process the way SIGTERM does (drain, then exit), with its own exit status.
    app[STATE].stop_process = lambda: signal.raise_signal(signal.SIGTERM)
    app.on_startup.append(log_stop_signals)
    try:
        _run(app, settings, first_bytes)
    except UpstreamUnavailableAtStart as exc:
        log.error("%s: %s", exc.code, exc, extra={"fields": {"code": exc.code}})
        return ExitStatus.UNAVAILABLE
    except ModelLoadingFailed as exc:
        log.error("%s: %s", exc.code, exc, extra={"fields": {"code": exc.code}})
        return ExitStatus.MODEL_LOADING_FAILED
    except OSError as exc:
        if exc.errno not in _LISTEN_ERRORS:
            raise
        address = f"{settings.server_host}:{settings.server_port}"
        log.error("cannot listen on %s: %s", address, exc.strerror, extra={"fields": {"code": "cannot_listen"}})
        return ExitStatus.UNAVAILABLE
    return ExitStatus.ENGINE_FAILED if app[STATE].failure is not None else ExitStatus.STOPPED


def _raise_open_file_limit() -> None:
    """Every connection holds a file descriptor, and Linux's default soft limit is 1024 (256 on some boxes) while
    the hard limit allows far more: with the soft one, 300 silent connections left no descriptor for the next
    client, the probes included. The soft limit is raised to the hard one (at most ``_MOST_OPEN_FILES``), as Go's
    runtime and nginx's worker_rlimit_nofile do; what is left then is what the administrator set."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _MOST_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, _MOST_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        log.debug("open-file limit raised from %d to %d", soft, wanted)


def _run(app: web.Application, settings: Settings, first_bytes: FirstBytes) -> None:
    """Serve until stopped. The port is bound first (so that a port someone else has fails at once), but listens
    only once the models have loaded during app start-up: a model that fails to load never leaves a half-alive
    server listening. The sockets are our own (``first_byte.py``): each request's clock starts at its first byte."""
    sockets = first_bytes.listening_sockets(settings.server_host, settings.server_port)

    def listening(_banner: str) -> None:
        # aiohttp calls ``print`` once its sites listen: the moment to say where, in our log format.
        announce_listening(app, settings.server_host, settings.server_port)

    # handler_cancellation: a client that disconnects cancels its handler, so its generation stops and its slot
    # is freed at once (aiohttp's default would generate every token for nobody). aiohttp's own wait for handlers
    # comes after our drain (on_shutdown), which has already waited SHUTDOWN_TIMEOUT.
    web.run_app(
        app,
        sock=sockets,
        print=listening,
        access_log=None,
        shutdown_timeout=STOP_MARGIN_S,
        keepalive_timeout=settings.keepalive_timeout,
        handler_cancellation=True,
    )


if __name__ == "__main__":
    sys.exit(main())
