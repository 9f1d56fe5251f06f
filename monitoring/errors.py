"""The error monitoring raises when it cannot start; the message says what to do."""

from __future__ import annotations


class MonitoringError(RuntimeError):
    """Monitoring cannot start (no champion, no data for the batch); the message says what to do."""
