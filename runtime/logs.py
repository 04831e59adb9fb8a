"""Structured (one JSON object per line) logs for the line-side processes.

Log shippers on line PCs (journald, Fluent Bit, Loki) index JSON fields directly; free text needs
a parser per message. Events carry their fields through ``extra={"fields": {...}}`` so the message
stays a short, greppable event name.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

LOGGER_NAME = "llb_edge.runtime"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _add_json_handler(logger: logging.Logger, stream: TextIO | None) -> None:
    for handler in logger.handlers:
        if getattr(handler, "_llb_json", False):
            return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._llb_json = True  # type: ignore[attr-defined]
    logger.addHandler(handler)


def configure_json_logging(level: int | str = logging.INFO, stream: TextIO | None = None) -> None:
    """Send the runtime's logs to ``stream`` (stderr) as JSON lines; idempotent."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    _add_json_handler(logger, stream)
    logger.propagate = False


def capture_library_logs(quiet: Sequence[str] = (), stream: TextIO | None = None) -> None:
    """JSON lines for every other logger too (libraries, asyncio, Python warnings); idempotent.

    Without a handler of their own, their records reach stderr as plain text through Python's
    last-resort handler, which a log shipper parsing JSON lines cannot read. ``quiet`` loggers pass
    ERROR and worse only (for libraries whose warnings repeat what the runtime's events say).
    For a process entry point: it changes the root logger.
    """
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    _add_json_handler(logging.getLogger(), stream)
    logging.captureWarnings(True)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    logger.log(level, event, extra={"fields": fields})


class RateLimitedLog:
    """At most one line per key per interval, reporting how many were suppressed.

    A broken camera can send thousands of bad frames a second; the counters have the totals, the
    log only needs to say that it is happening and what the last one looked like.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: str, event: str, **fields: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, float("-inf")) < self._interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        log_event(self._logger, level, event, suppressed=suppressed, **fields)
