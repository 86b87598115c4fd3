"""The process's exit statuses: one per cause, so that a supervisor (systemd, Kubernetes) can tell what a restart
would mend. ``etc/genai-server.service`` lists the two that it must not retry."""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """Why ``genai-server`` ended."""

    STOPPED = 0  # SIGTERM/SIGINT, drained
    CRASHED = 1  # an uncaught exception (Python's own status): a restart may help
    BAD_SETTING = 2  # a setting has a bad value (argparse's status for bad flags too): retrying cannot help
    ENGINE_FAILED = 3  # an engine died while serving: restart
    MODEL_LOADING_FAILED = 4  # the model folder cannot be loaded: retrying cannot help
    UNAVAILABLE = 5  # the port is taken or an upstream could not be listed at start-up: retry later


# What a supervisor must not restart: the same configuration would fail the same way.
NOT_RETRIED = (ExitStatus.BAD_SETTING, ExitStatus.MODEL_LOADING_FAILED)
