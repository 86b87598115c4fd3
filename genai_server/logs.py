"""Logging set-up: JSON lines for machines or plain text for people, chosen by LOG_FORMAT."""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# The request being handled, if any: set by the request log middleware for the handler's task (and every task it
# starts), so each line logged on its behalf carries its id (errors, disconnects, upstream faults).
current_request_id: ContextVar[str | None] = ContextVar("current_request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to the fields of a record logged while a request is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current_request_id.get()
        fields = getattr(record, "fields", None) or {}
        if request_id is not None and "request_id" not in fields:
            record.fields = {"request_id": request_id, **fields}
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; structured fields come from ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# Control characters (CR and LF among them) in a message or a field: a client's URL path would otherwise forge
# log lines in the text format (``%0d%0a`` decodes to a line break).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


class TextFormatter(logging.Formatter):
    """Readable lines with the structured fields appended as ``key=value``; one record is one line (a traceback
    follows on its own lines)."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {_escape(record.getMessage())}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{key}={_escape(str(value))}" for key, value in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str, fmt: str) -> None:
    """Send every log record to stderr in ``fmt`` (json or text) at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())  # on the handler: it sees the records of every logger, aiohttp's included
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log would duplicate ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
