"""``python -m genai_server``: read settings, load the model, serve until stopped."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from genai_server.app import create_app
from genai_server.errors import ModelLoadingFailed
from genai_server.logs import setup_logging
from genai_server.settings import SettingsError, load_settings

log = logging.getLogger("genai_server")


def main(argv: list[str] | None = None) -> int:
    """Run the server; the exit status is 0 after a clean stop, 1 if the model fails, 2 for bad settings."""
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"genai_server: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        # The model loads during app start-up, before the port is bound: a model that
        # fails to load never leaves a half-alive server listening.
        # aiohttp's own wait comes after our drain (on_shutdown), so give it room not to cut it short.
        web.run_app(create_app(settings), host=settings.server_host, port=settings.server_port,
                    print=None, access_log=None, shutdown_timeout=settings.shutdown_timeout + 5,
                    keepalive_timeout=settings.keepalive_timeout)
    except ModelLoadingFailed as exc:
        log.error("model_loading_failed: %s", exc, extra={"fields": {"code": exc.code}})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
