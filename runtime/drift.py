"""Line-side drift check: each camera's NG rate over a sliding window vs the bundle's expected rate.

The bundle records the false-reject rate its calibration images predict at the threshold in use
(bundle.json ``threshold.frr.expected``; recomputed for a runtime override). On a line of normal
parts the NG count in a window of W frames is then Binomial(W, expected) at most; a count that
such a law produces with probability below ``alpha`` (llb_edge.calibration.binomial_alarm_count)
means the line no longer looks like the calibration images: lighting, focus, a new part variant,
or a real run of defects. The monitor logs ``ng_rate_high`` once when a camera's full window
crosses that count, ``ng_rate_normal`` once when it falls back, and exports per camera:

- ``llb_ng_rate{camera}``: NG fraction of the camera's last W inspected frames;
- ``llb_ng_rate_alarm{camera}``: 1 while that window is over the alarm count;
- ``llb_ng_rate_expected``: the expected rate (absent when the bundle has no calibration);
- ``llb_ng_rate_alarm_count``: the alarm count for a full window.

Windows restart when the model or threshold changes: earlier decisions were made with another one.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from llb_edge.calibration import binomial_alarm_count
from llb_edge.runtime.health import MetricsRegistry
from llb_edge.runtime.logs import log_event

DEFAULT_NG_RATE_WINDOW = 500
DEFAULT_NG_RATE_ALPHA = 1e-3


class NgRateMonitor:
    def __init__(
        self, registry: MetricsRegistry, logger: logging.Logger, window: int = DEFAULT_NG_RATE_WINDOW,
        alpha: float = DEFAULT_NG_RATE_ALPHA,
    ) -> None:
        if window < 1 or not 0.0 < alpha < 1.0:
            raise ValueError(f"the NG-rate window must be >= 1 and alpha in (0, 1), got {window}, {alpha}")
        self.window = window
        self.alpha = alpha
        self._logger = logger
        self._lock = threading.Lock()
        self._decisions: dict[str, deque[bool]] = {}
        self._counts: dict[str, int] = {}
        self._alarmed: set[str] = set()
        self._expected: float | None = None
        self._alarm_count: int | None = None
        self.rate = registry.gauge("llb_ng_rate", "NG fraction of the camera's last window of inspected frames",
                                   ["camera"])
        self.alarm = registry.gauge("llb_ng_rate_alarm", "1 while the camera's NG rate is improbably high for "
                                    "the expected rate (binomial test over a full window)", ["camera"])
        self.expected = registry.gauge("llb_ng_rate_expected", "False-reject rate the bundle's calibration "
                                       "predicts at the threshold in use")
        self.alarm_count = registry.gauge("llb_ng_rate_alarm_count", "NG frames in a full window that raise the alarm")

    def set_expected(self, rate: float | None) -> None:
        """A new model or threshold: its expected rate (None: unknown, no alarm), and fresh windows."""
        with self._lock:
            self._expected = rate
            self._alarm_count = binomial_alarm_count(self.window, rate, self.alpha) if rate is not None else None
            self._decisions.clear()
            self._counts.clear()
            self._alarmed.clear()
            self.rate.clear()
            self.alarm.clear()
            self.expected.clear()
            self.alarm_count.clear()
            if rate is not None and self._alarm_count is not None:
                self.expected.set(rate)
                self.alarm_count.set(self._alarm_count)

    def record(self, camera: str, ng: bool) -> None:
        with self._lock:
            window = self._decisions.setdefault(camera, deque())
            count = self._counts.get(camera, 0) + int(ng)
            window.append(ng)
            if len(window) > self.window:
                count -= int(window.popleft())
            self._counts[camera] = count
            self.rate.set(count / len(window), camera=camera)
            limit = self._alarm_count
            if limit is None or len(window) < self.window:
                return
            high = count >= limit
            if high == (camera in self._alarmed):
                return
            self.alarm.set(1.0 if high else 0.0, camera=camera)
            if high:
                self._alarmed.add(camera)
            else:
                self._alarmed.discard(camera)
            expected = self._expected
        log_event(self._logger, logging.WARNING if high else logging.INFO, "ng_rate_high" if high else "ng_rate_normal",
                  camera_id=camera, ng=count, window=self.window, rate=round(count / self.window, 5),
                  expected=expected, alarm_count=limit)
