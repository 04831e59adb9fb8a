"""The operator page: a read-only web page the daemon serves on its health server (docs/operator-page.md).

What the daemon does per inspected frame is :meth:`OperatorPage.record`: a reference to the frame,
a copy of its small anomaly map and a few counters, under a lock (no image copy, no encoding).
Everything visual happens on the HTTP server's threads and only when a browser asks: the overlay is
drawn and JPEG-encoded the first time a frame's image is requested and cached on that frame, so a
page polling several times a second costs one encode per camera per new frame it shows, and a
closed page costs nothing but ``record``.

Memory is bounded by fixed rings per camera (cameras are bounded by ``max_cameras``):

- the latest inspected frame;
- the last ``PAGE_NG_FRAMES`` NG frames (the gallery);
- the last ``PAGE_SHOWN_FRAMES`` frames the page's state told a browser about, so the image the
  browser asks for next still exists when the line has moved on.

A held frame is the decoded original the daemon already has (a reference, not a copy) plus a copy
of its model-sized anomaly map and, once requested, its encoded JPEGs (tens to hundreds of KiB): at most
``1 + PAGE_NG_FRAMES + PAGE_SHOWN_FRAMES`` frames per camera (13 x 3 MiB = 39 MiB per camera for
1024 x 1024 RGB frames). Rates come from a ring of per-second counts over ``SERIES_WINDOW_S``.

Nothing served here changes the daemon: every route is a GET of state (HTTP's other methods are
refused by the server), images are addressed by the page's own sequence numbers (no camera or frame
ids in URLs), and the page's script writes text into the document, never markup, so a hostile
camera id shows up as text.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from llb_edge.bundle import Bundle
from llb_edge.data.transforms import Geometry
from llb_edge.protocol import DECISION_NG, ResultHeader
from llb_edge.runtime.health import HttpAnswer
from llb_edge.runtime.logs import get_logger

PAGE_NG_FRAMES = 8  # NG frames kept per camera for the gallery
PAGE_SHOWN_FRAMES = 4  # frames per camera a browser was told about and may still ask for
THUMB_MAX_SIDE = 480  # the live view, longer side in pixels
GALLERY_MAX_SIDE = 160  # NG gallery thumbnails
FULL_MAX_SIDE = 2048  # the "full size" views, so a 64-megapixel frame cannot cost a huge encode
JPEG_QUALITY = 80
OVERLAY_MAX_ALPHA = 0.6  # how much of the heat colour covers the frame where the map is hottest
SERIES_WINDOW_S = 600  # NG rate and throughput plots: the last 10 minutes
SERIES_BIN_S = 10  # one plotted point per 10 s
REFRESH_MS = 400  # how often the page polls its state (the page reads it from the state)
PAGE_THREAD_NICE = 19  # the page's HTTP threads run at the lowest CPU priority (Linux)

PAGE_MODEL_FIELDS = ("model_id", "model_version", "backend", "threshold", "threshold_override", "expected_ng_rate")
# view -> (longer side at most, map overlaid): the box is drawn on every view
IMAGE_VIEWS = {
    "thumb": (THUMB_MAX_SIDE, True),
    "mini": (GALLERY_MAX_SIDE, True),
    "image": (FULL_MAX_SIDE, False),
    "overlay": (FULL_MAX_SIDE, True),
}
STATIC_FILES = {
    "/": ("operator.html", "text/html; charset=utf-8"),
    "/page/operator.js": ("operator.js", "text/javascript; charset=utf-8"),
    "/page/operator.css": ("operator.css", "text/css; charset=utf-8"),
    "/favicon.ico": ("favicon.svg", "image/svg+xml"),  # browsers ask for it whatever the page links
}
IMAGE_PREFIX = "/page/image/"
STATE_PATH = "/page/state.json"
# Only the page's own files; no inline script, no other origin (works without internet).
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
     "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)


logger = get_logger("operator_page")


def _finite_or_none(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _error_total(errors: object) -> float | None:
    """The daemon's error total, whether its status gives the number or the counts per code."""
    if isinstance(errors, Mapping):
        return float(sum(value for value in errors.values() if _finite_or_none(value) is not None))
    return _finite_or_none(errors)


def _count(value: object) -> int | None:
    number = _finite_or_none(value)
    return None if number is None else int(number)


def expected_rates(bundle: Bundle | None) -> dict[str, Any]:
    """What the bundle says the reject rate should be, read defensively.

    ``threshold.frr.expected`` (the false-reject rate the calibration slice predicts at the bundle's
    threshold) when the bundle was calibrated for one, else None; the threshold's method and the
    training score statistics are shown either way so the operator sees what the threshold rests on.
    """
    if bundle is None:
        return {"expected_frr": None, "threshold_method": None, "score_stats": {}}
    manifest = bundle.manifest
    frr = manifest.threshold.frr.get("expected")  # absent from bundles calibrated without labels-free FRR
    stats = {str(key): value for key, value in manifest.score_stats.items() if _finite_or_none(value) is not None}
    return {
        "expected_frr": _finite_or_none(frr),
        "threshold_method": str(manifest.threshold.method),
        "score_stats": stats,
    }


def _downscale(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Halve with a Gaussian pyramid while over twice the target, then bilinear: close to area
    averaging (no aliasing of thin defects) at a fraction of INTER_AREA's cost at odd factors."""
    while image.shape[0] >= 2 * height and image.shape[1] >= 2 * width:
        image = cv2.pyrDown(image)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def render_view(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    geometry: Geometry,
    threshold: float,
    bbox: tuple[int, int, int, int] | None,
    max_side: int,
    with_map: bool,
) -> np.ndarray:
    """The frame (uint8 RGB) downscaled to ``max_side``, the map overlaid as heat, the region boxed.

    The heat colour is the map relative to ``threshold``, the decision threshold in use (it is the
    middle of the colour scale), so the same colour means the same thing on every frame and model.
    """
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
    view = _downscale(image, out_w, out_h) if scale < 1 else image.copy()
    if with_map:
        values = geometry.map_to_original(anomaly_map.reshape(anomaly_map.shape[-2:]), out_h, out_w)
        reference = threshold if threshold > 0 else max(float(values.max()), 1e-12)
        level = np.clip(values / (2 * reference), 0.0, 1.0)
        heat = cv2.cvtColor(cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
        weight = (OVERLAY_MAX_ALPHA * level).astype(np.float32)
        view = cv2.blendLinear(view, heat, 1.0 - weight, weight)
    if bbox is not None:
        x, y, w, h = (value * scale for value in bbox)
        thickness = max(2, round(max(out_h, out_w) / 240))
        top_left = (int(x), int(y))
        bottom_right = (int(math.ceil(x + w)) - 1, int(math.ceil(y + h)) - 1)
        cv2.rectangle(view, top_left, bottom_right, (255, 0, 255), thickness)
    return view


def encode_jpeg(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


@dataclass(eq=False)  # identity: two frames are never "equal" by their pixels
class PageFrame:
    """One inspected frame the page may show, with its JPEGs once encoded."""

    seq: int
    result: ResultHeader
    image: np.ndarray
    anomaly_map: np.ndarray
    geometry: Geometry
    threshold: float
    inspected_at: float  # time.time()
    received: float  # perf_counter when the daemon received it
    _jpegs: dict[str, bytes] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> dict[str, Any]:
        result = self.result
        return {
            "seq": self.seq,
            "camera_id": result.camera_id,
            "frame_id": result.frame_id,
            "decision": result.decision,
            "score": result.score,
            "threshold": result.threshold,
            "region": None if result.region is None else {"bbox": result.region.bbox, "area_px": result.region.area_px},
            "image_size": result.image_size,
            "latency_ms": result.latency_ms.get("total"),
            "model_version": result.model_version,
            "capture_ts": result.capture_ts,
            "inspected_at": self.inspected_at,
        }

    def jpeg(self, view: str) -> bytes:
        # One encode per frame and view; a second request for it waits for the first.
        with self._lock:
            data = self._jpegs.get(view)
            if data is None:
                bbox = self.result.region.bbox if self.result.region is not None else None
                max_side, with_map = IMAGE_VIEWS[view]
                rgb = render_view(
                    self.image, self.anomaly_map, self.geometry, self.threshold, bbox, max_side, with_map
                )
                data = self._jpegs[view] = encode_jpeg(rgb)
            return data


@dataclass
class _Camera:
    latest: PageFrame | None = None
    ng: list[PageFrame] = field(default_factory=list)  # the newest PAGE_NG_FRAMES by arrival, oldest first
    shown: deque[PageFrame] = field(default_factory=lambda: deque(maxlen=PAGE_SHOWN_FRAMES))
    frames: int = 0
    ng_count: int = 0

    def held(self) -> list[PageFrame]:
        return [frame for frame in (self.latest, *self.shown, *self.ng) if frame is not None]

    def find(self, seq: int) -> PageFrame | None:
        return next((frame for frame in self.held() if frame.seq == seq), None)


class RateSeries:
    """Inspected and NG frames per second over the last ``window_s`` seconds (a fixed ring)."""

    def __init__(self, window_s: int = SERIES_WINDOW_S) -> None:
        self.window_s = window_s
        self._seconds: deque[list[int]] = deque(maxlen=window_s)  # [unix second, frames, ng]

    def add(self, ng: bool, now: float) -> None:
        second = int(now)
        # A post worker finishing a moment late counts in the newest second: the ring stays ordered.
        if not self._seconds or second > self._seconds[-1][0]:
            self._seconds.append([second, 0, 0])
        self._seconds[-1][1] += 1
        self._seconds[-1][2] += int(ng)

    def bins(self, now: float, bin_s: int = SERIES_BIN_S) -> dict[str, Any]:
        """Per ``bin_s`` bin, oldest first: frames/s and NG rate (None for a bin without frames).

        The newest bin ends at the last whole second, so it is never a partly filled one.
        """
        count = self.window_s // bin_s
        end = int(now)
        start = end - count * bin_s
        frames = [0] * count
        ng = [0] * count
        for second, seen, rejected in self._seconds:
            if start <= second < end:
                index = (second - start) // bin_s
                frames[index] += seen
                ng[index] += rejected
        return {
            "bin_s": bin_s,
            "window_s": count * bin_s,
            "frames_per_s": [seen / bin_s for seen in frames],
            "ng_rate": [rejected / seen if seen else None for seen, rejected in zip(frames, ng, strict=True)],
            "frames": sum(frames),
            "ng": sum(ng),
        }


def _yield_to_the_line() -> None:
    """Lower the calling HTTP thread's CPU priority to the lowest (nice 19) on Linux, for good.

    The server runs each request on a fresh thread (HTTP/1.0, one request per connection), so this
    only ever affects one image request: its drawing and encoding get the CPU that the inference,
    post-processing and publishing threads leave, and a browser cannot slow the line down even on
    a saturated machine. Linux schedules threads as tasks with their own
    nice value; elsewhere the thread id is not a process id and this does nothing.
    """
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PAGE_THREAD_NICE)


class OperatorPage:
    """The page's state and routes; ``status`` and ``bundle`` are read from the daemon per request."""

    def __init__(self, status: Callable[[], dict[str, Any]], bundle: Callable[[], Bundle | None]) -> None:
        self._status = status
        self._bundle = bundle
        self._lock = threading.Lock()
        self._cameras: dict[str, _Camera] = {}
        self._series = RateSeries()
        self._seq = 0
        package = resources.files("llb_edge.runtime") / "page"
        self._static = {
            path: HttpAnswer(200, content_type, (package / name).read_bytes(), SECURITY_HEADERS)
            for path, (name, content_type) in STATIC_FILES.items()
        }

    def record(
        self,
        result: ResultHeader,
        image: np.ndarray,
        anomaly_map: np.ndarray,
        geometry: Geometry,
        threshold: float,
        received: float,
    ) -> None:
        """Keep an inspected frame for the page: O(1), no encoding (called by the daemon's post workers).

        ``image`` must not change afterwards (the daemon never modifies a frame after inference).
        ``received`` (perf_counter at arrival) orders frames: post workers finish out of order, and
        the live view must not step back to an older frame.
        """
        now = time.time()
        ng = result.decision == DECISION_NG
        # A copy: the map is a view into its batch's output, which would otherwise stay alive.
        own_map = np.array(anomaly_map, dtype=np.float32, copy=True)
        with self._lock:
            self._seq += 1
            frame = PageFrame(self._seq, result, image, own_map, geometry, threshold, now, received)
            camera = self._cameras.setdefault(result.camera_id, _Camera())
            if camera.latest is None or received >= camera.latest.received:
                camera.latest = frame
            camera.frames += 1
            if ng:
                # Post workers finish out of order: keep the newest NG frames by arrival, not by finish.
                camera.ng.append(frame)
                camera.ng.sort(key=lambda held: held.received)
                del camera.ng[:-PAGE_NG_FRAMES]
                camera.ng_count += 1
            self._series.add(ng, now)

    def state(self) -> dict[str, Any]:
        status = self._status()
        bundle = self._bundle()
        now = time.time()
        cameras = []
        with self._lock:
            for camera_id in sorted(self._cameras):
                camera = self._cameras[camera_id]
                latest = camera.latest
                if latest is not None and latest not in camera.shown:
                    camera.shown.append(latest)  # the browser will ask for its image next
                cameras.append(
                    {
                        "camera_id": camera_id,
                        "frames": camera.frames,
                        "ng": camera.ng_count,
                        "queue_depth": status.get("queues", {}).get(camera_id, 0),
                        "latest": latest.summary() if latest is not None else None,
                        "gallery": [frame.summary() for frame in reversed(camera.ng)],
                    }
                )
            series = self._series.bins(now)
        model = status.get("model") or {}
        return {
            "now": now,
            "refresh_ms": REFRESH_MS,
            "state": status.get("state"),
            "ready": status.get("ready"),
            "uptime_s": status.get("uptime_s"),
            "model": {key: model.get(key) for key in PAGE_MODEL_FIELDS},
            "expected": expected_rates(bundle),
            "totals": {
                "frames": _count(status.get("frames")),
                "errors": _count(_error_total(status.get("errors"))),
                "drops": _count(status.get("drops")),
                "queue_depth": sum(status.get("queues", {}).values()),
                "queue_capacity": status.get("queue_capacity"),
            },
            "cameras": cameras,
            "series": series,
            "limits": {"gallery": PAGE_NG_FRAMES, "views": {view: side for view, (side, _) in IMAGE_VIEWS.items()}},
        }

    def image(self, seq: int, view: str) -> bytes | None:
        with self._lock:
            frame = next((found for camera in self._cameras.values() if (found := camera.find(seq))), None)
        if frame is None:
            return None
        # Drawing and encoding are the page's one real cost: done at the lowest priority, outside
        # the page's lock (a descheduled low-priority thread must not hold up record()).
        _yield_to_the_line()
        return frame.jpeg(view)

    def handle(self, target: str) -> HttpAnswer | None:
        """The answer for a GET of ``target`` (path and query), or None when it is not the page's."""
        try:
            return self._route(target)
        except Exception as err:  # noqa: BLE001 - a page bug answers 500, never reaches the serving threads
            logger.exception("operator_page_failed", extra={"fields": {"target": target[:200], "error": repr(err)}})
            return HttpAnswer(500, "text/plain", b"internal error\n")

    def _route(self, target: str) -> HttpAnswer | None:
        parts = urlsplit(target)
        path = parts.path
        if path in self._static:
            return self._static[path]
        if path == STATE_PATH:
            body = json.dumps(self.state(), allow_nan=False, default=str).encode()
            return HttpAnswer(200, "application/json", body, (*SECURITY_HEADERS, ("Cache-Control", "no-store")))
        if path.startswith(IMAGE_PREFIX):
            return self._image_answer(path[len(IMAGE_PREFIX) :], parse_qs(parts.query))
        return None

    def _image_answer(self, name: str, query: dict[str, list[str]]) -> HttpAnswer:
        stem, dot, suffix = name.partition(".")
        view = query.get("view", ["thumb"])[-1]
        if not (dot and suffix == "jpg" and stem.isascii() and stem.isdigit() and len(stem) <= 18) or (
            view not in IMAGE_VIEWS
        ):
            usage = f"expected /page/image/<seq>.jpg?view={'|'.join(IMAGE_VIEWS)}\n"
            return HttpAnswer(400, "text/plain", usage.encode())
        data = self.image(int(stem), view)
        if data is None:
            return HttpAnswer(404, "text/plain", b"frame no longer held\n", (("Cache-Control", "no-store"),))
        # A sequence number names one frame forever: the browser may keep its JPEG.
        return HttpAnswer(200, "image/jpeg", data, (*SECURITY_HEADERS, ("Cache-Control", "private, max-age=3600")))
