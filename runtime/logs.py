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
DEFAULT_LOG_LEVEL = "INFO"  # of the daemon and the gateway


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


def configure_json_logging(level: int | str = DEFAULT_LOG_LEVEL, stream: TextIO | None = None) -> None:
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
    """Repeated events logged in full only a few times per window, then counted.

    Per key: the first ``burst`` events of each ``interval_s`` window are logged (with their
    traceback when ``exc_info`` is given); later ones are only counted, and the count is logged as
    one ``log_suppressed`` line when the window ends: at the key's next event or at the next
    :meth:`flush` (call it periodically, so the count of a burst that stopped is not lost).

    A broken camera can send thousands of bad frames a second; the counters have the totals, the
    log only needs to say that it is happening and what one of them looked like.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0, burst: int = 1) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._burst = burst
        self._windows: dict[str, list[Any]] = {}  # key -> [window start, logged, suppressed, event, level]
        self._lock = threading.Lock()

    def log(
        self, level: int, key: str, event: str, *, exc_info: BaseException | None = None, **fields: Any
    ) -> bool:
        """Log the event unless its key is over its burst in this window; True when logged."""
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(key)
            summary = None
            if window is None or now - window[0] >= self._interval_s:
                summary = self._close(key, window, now)
                window = self._windows[key] = [now, 0, 0, event, level]
            if window[1] >= self._burst:
                window[2] += 1
                return False
            window[1] += 1
        if summary is not None:
            self._emit_summary(*summary)
        self._logger.log(level, event, exc_info=exc_info, extra={"fields": fields})
        return True

    def flush(self) -> None:
        """Log the counts of windows that ended (e.g. from a periodic timer)."""
        now = time.monotonic()
        with self._lock:
            ended = [key for key, window in self._windows.items() if now - window[0] >= self._interval_s]
            summaries = [self._close(key, self._windows.pop(key), now) for key in ended]
        for summary in summaries:
            if summary is not None:
                self._emit_summary(*summary)

    def _close(self, key: str, window: list[Any] | None, now: float) -> tuple[str, int, float, str, int] | None:
        if window is None or window[2] == 0:
            return None
        return key, window[2], round(now - window[0], 3), window[3], window[4]

    def _emit_summary(self, key: str, count: int, seconds: float, event: str, level: int) -> None:
        log_event(self._logger, level, "log_suppressed", key=key, of_event=event, suppressed=count, window_s=seconds)
