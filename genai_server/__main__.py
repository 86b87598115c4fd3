"""``python -m genai_server``: read settings, load the model, serve until stopped."""

from __future__ import annotations

import logging
import signal
import sys

from aiohttp import web

from genai_server.app import create_app
from genai_server.errors import ModelLoadingFailed
from genai_server.lifecycle import EXIT_ENGINE_FAILED, STATE, STOP_MARGIN_S
from genai_server.logs import setup_logging
from genai_server.settings import SettingsError, load_settings

log = logging.getLogger("genai_server")


def main(argv: list[str] | None = None) -> int:
    """Run the server; the exit status is 0 after a clean stop, 1 if the model fails, 2 for bad settings, 3 if an
    engine failed while serving."""
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"genai_server: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    # A failed engine stops the process the way SIGTERM does (drain, then exit), with its own exit status.
    app[STATE].stop_process = lambda: signal.raise_signal(signal.SIGTERM)
    try:
        # The model loads during app start-up, before the port is bound: a model that
        # fails to load never leaves a half-alive server listening.
        # handler_cancellation: a client that disconnects cancels its handler, so its generation stops and its
        # slot is freed at once (aiohttp's default would generate every token for nobody). aiohttp's own wait
        # for handlers comes after our drain (on_shutdown), which has already waited SHUTDOWN_TIMEOUT.
        web.run_app(
            app,
            host=settings.server_host,
            port=settings.server_port,
            print=None,
            access_log=None,
            shutdown_timeout=STOP_MARGIN_S,
            keepalive_timeout=settings.keepalive_timeout,
            handler_cancellation=True,
        )
    except ModelLoadingFailed as exc:
        log.error("model_loading_failed: %s", exc, extra={"fields": {"code": exc.code}})
        return 1
    return EXIT_ENGINE_FAILED if app[STATE].failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
