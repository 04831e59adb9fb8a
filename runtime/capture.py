"""Capture of sampled line frames into a pool folder: the training data of `llb-edge retrain`.

The pool's layout and its reader are in llb_edge/pool.py (read by labelling and retrain too).

Rules this module keeps, because the daemon's first job is inspecting, not archiving:

- ``offer`` is O(1) and never blocks: a sampling decision and a ``put_nowait`` into a bounded queue
  (bounded in frames and in bytes). When the writer falls behind, captures are dropped and counted
  (``llb_capture_dropped_total``); the inspection result has already been published by then.
- One writer thread does the PNG encoding and file I/O, at a lower CPU priority where the OS allows
  it, so encoding competes as little as possible with inference.
- Files appear atomically: encoded in memory, written to a hidden temp name in the same folder
  (``.<name>.tmp``, which no ``*.png`` glob and no dataset reader matches), optionally fsynced, then
  ``os.replace``d to the final name. The manifest line is appended only after the image is in place,
  so it never points at a file that is not (yet) there.
- A disk quota on the frames folder, enforced oldest-first by file name (names start with the
  daemon's UTC capture time, so name order is capture order, independent of file mtimes).

Sampling: each frame is captured with probability ``p = max(rate of its camera, ng_rate if NG,
band_rate if its score is within ``band`` of the threshold)``. ``p`` is written to the manifest, so
retrain can undo the over-sampling of NG / near-threshold frames when it estimates NG rates
(each frame weighs 1/p).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from llb_edge.pool import FRAMES_DIR, IMAGE_GLOB, IMAGE_SUFFIX, MANIFEST_NAME, TEMP_SUFFIX, manifest_lines
from llb_edge.runtime.health import MetricsRegistry
from llb_edge.runtime.logs import RateLimitedLog, get_logger, log_event

# OpenCV's PNG level 1: about 3x faster than its default (3) for ~10% more bytes. Still lossless.
PNG_COMPRESSION = 1
# Rewrite the manifest without evicted frames once this many dead lines have accumulated (and they
# outnumber the live ones): keeps it proportional to the pool without rewriting on every eviction.
COMPACT_MIN_DEAD = 1000
WRITER_NICE = 10

logger = get_logger("capture")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class CaptureOptions:
    """The ``capture`` option group of ServeOptions (``llb-edge serve --capture-*``)."""

    pool_dir: Path | None = None  # None: capture off
    rate: float = 0.0  # fraction of frames captured, per camera unless camera_rates names it
    camera_rates: dict[str, float] = field(default_factory=dict)  # camera id -> its own rate
    ng_rate: float = 0.0  # NG frames are captured with at least this probability (every camera)
    band: float = 0.0  # near-threshold: |score - threshold| <= band * |threshold| (0: off)
    band_rate: float = 1.0  # near-threshold frames are captured with at least this probability
    quota_mb: float = 2048.0  # disk quota of the frames folder; oldest frames are evicted beyond it
    queue_size: int = 32  # frames waiting for the writer; beyond it captures are dropped
    queue_mb: float = 256.0  # bytes of frames waiting for the writer (large frames hit this first)
    fsync: bool = False  # fsync each frame before it appears (survives power loss; slower)
    seed: int | None = None  # sampling RNG seed (tests); None: random

    @property
    def enabled(self) -> bool:
        return self.pool_dir is not None

    def rate_for(self, camera_id: str) -> float:
        return self.camera_rates.get(camera_id, self.rate)

    def problems(self) -> list[str]:
        """What is wrong with these options (empty when valid); ServeOptions.validate reports them."""
        found = []
        rates = {"capture rate": self.rate, "capture ng_rate": self.ng_rate, "capture band_rate": self.band_rate}
        rates.update({f"capture rate of camera {cam}": value for cam, value in self.camera_rates.items()})
        found += [f"{name} must be in [0, 1]" for name, value in rates.items() if not 0.0 <= value <= 1.0]
        if self.band < 0:
            found.append("capture band must be >= 0")
        if self.quota_mb <= 0 or self.queue_mb <= 0:
            found.append("capture quota_mb and queue_mb must be > 0")
        if self.queue_size < 1:
            found.append("capture queue_size must be >= 1")
        return found


def parse_camera_rates(items: list[str] | tuple[str, ...]) -> dict[str, float]:
    """``["cam1=0.5", "cam2=0"]`` (the repeatable --capture-camera-rate flag) -> {camera: rate}."""
    rates = {}
    for item in items:
        camera, sep, value = item.rpartition("=")
        try:
            rates[camera] = float(value)
        except ValueError:
            camera = ""
        if not sep or not camera:
            raise ValueError(f"camera rate {item!r} is not of the form CAMERA=RATE")
    return rates


def capture_probability(
    options: CaptureOptions, camera_id: str, decision: str | None, score: float, threshold: float
) -> tuple[float, str]:
    """(probability of capturing this frame, the rule that set it: sample | ng | band)."""
    p, reason = options.rate_for(camera_id), "sample"
    if decision == "NG" and options.ng_rate > p:
        p, reason = options.ng_rate, "ng"
    if options.band > 0 and abs(score - threshold) <= options.band * abs(threshold) and options.band_rate > p:
        p, reason = options.band_rate, "band"
    return p, reason


def _safe(text: object, limit: int = 48) -> str:
    """A file-name-safe form of a camera or frame id (ids may hold ':' or any character)."""
    return _UNSAFE.sub("_", str(text))[:limit] or "_"


def frame_file_name(wall_time: float, camera_id: str, frame_id: int | str, seq: int) -> str:
    """``<UTC time to the ms>_<camera>_<frame id>_<seq>.png``: sorts in capture order."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(wall_time)) + f"{int(wall_time * 1000) % 1000:03d}"
    return f"{stamp}_{_safe(camera_id)}_{_safe(frame_id)}_{seq % 1_000_000:06d}{IMAGE_SUFFIX}"


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG of an RGB frame; a gray frame (three equal channels) is stored as one channel.

    Industrial cameras are often monochrome and the daemon expands them to RGB; reading the single
    channel back gives the same RGB pixels (llb_edge.data.images), at a third of the disk.
    """
    if image.ndim == 3 and np.array_equal(image[:, :, 0], image[:, :, 1]) and np.array_equal(
        image[:, :, 0], image[:, :, 2]
    ):
        pixels = image[:, :, 0]
    else:
        pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(IMAGE_SUFFIX, pixels, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise OSError("OpenCV could not encode the frame as PNG")
    return data.tobytes()


def write_atomically(folder: Path, name: str, data: bytes, fsync: bool = False) -> Path:
    """Write ``folder/name`` so that it appears complete or not at all (hidden temp + os.replace)."""
    target = folder / name
    temp = folder / f".{name}{TEMP_SUFFIX}"
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    if fsync:
        _fsync_dir(folder)
    return target


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class _Capture:
    image: np.ndarray
    meta: dict[str, Any]


class CaptureMetrics:
    """Capture counters, registered in the daemon's registry (names in docs/retrain.md)."""

    def __init__(self, registry: MetricsRegistry) -> None:
        r = registry
        self.saved = r.counter("llb_capture_saved_total", "Frames written to the capture pool", ["camera", "reason"])
        self.dropped = r.counter(
            "llb_capture_dropped_total", "Captures not written (queue_full, write_error, shutdown)", ["reason"]
        )
        self.evicted = r.counter("llb_capture_evicted_total", "Pool frames deleted to stay under the quota")
        self.pool_bytes = r.gauge("llb_capture_pool_bytes", "Bytes of frames in the capture pool")
        self.queue_depth = r.gauge("llb_capture_queue_depth", "Captures waiting for the writer")


class FrameCapture:
    """Samples inspected frames and writes them to the pool on a background thread.

    ``FrameCapture(options, registry).start()``; ``offer(...)`` from the inference thread after each
    result; ``stop()`` at shutdown. Nothing here raises into the caller once started.
    """

    def __init__(self, options: CaptureOptions, registry: MetricsRegistry | None = None) -> None:
        problems = options.problems()
        if options.pool_dir is None:
            problems.append("capture needs a pool_dir")
        if problems or options.pool_dir is None:
            raise ValueError("invalid capture options: " + "; ".join(problems))
        self.options = options
        self.pool_dir = Path(options.pool_dir)
        self.frames_dir = self.pool_dir / FRAMES_DIR
        self.manifest_path = self.pool_dir / MANIFEST_NAME
        self.metrics = CaptureMetrics(registry or MetricsRegistry())
        self._rng = random.Random(options.seed)
        self._queue: queue.Queue[_Capture | None] = queue.Queue(maxsize=options.queue_size)
        self._queue_bytes_limit = int(options.queue_mb * 2**20)
        self._quota_bytes = int(options.quota_mb * 2**20)
        self._lock = threading.Condition()
        self._pending = 0  # offered and not yet written or dropped
        self._pending_bytes = 0
        self._closing = False
        self._abandon = threading.Event()
        self._seq = 0
        self._files: deque[tuple[str, int]] = deque()  # (name, bytes), oldest first
        self._pool_bytes = 0
        self._dead_lines = 0
        self._live_lines = 0
        self._thread: threading.Thread | None = None
        self._error_log = RateLimitedLog(logger, interval_s=10.0)

    # ------------------------------------------------------------------------------- lifecycle

    def start(self) -> FrameCapture:
        """Create the pool folders, account for frames already there, start the writer."""
        self.frames_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.frames_dir.glob(f".*{TEMP_SUFFIX}"):  # left by a crash mid-write
            with contextlib.suppress(OSError):
                stale.unlink()
        for path in sorted(self.frames_dir.glob(IMAGE_GLOB)):
            size = path.stat().st_size
            self._files.append((path.name, size))
            self._pool_bytes += size
        self._live_lines = len(self._files)
        self._evict()  # a quota lowered since the last run applies at once (before the writer runs)
        self._thread = threading.Thread(target=self._writer_loop, name="llb-capture", daemon=True)
        self._thread.start()
        log_event(logger, logging.INFO, "capture_started", pool=str(self.pool_dir), frames=len(self._files),
                  pool_bytes=self._pool_bytes, rate=self.options.rate, ng_rate=self.options.ng_rate,
                  band=self.options.band)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (within ``timeout_s``; the rest is dropped as 'shutdown'), then stop."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._closing = True
        try:
            self._queue.put(None, timeout=max(0.01, deadline - time.monotonic()))
        except queue.Full:
            self._abandon.set()
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=1.0)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandon.set()
            self._thread.join(5.0)
        self._thread = None

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Block until every offered capture is written or dropped (tests, benchmarks)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, timeout_s)

    # ------------------------------------------------------------------------------- sampling

    def offer(
        self,
        image: np.ndarray,
        *,
        camera_id: str,
        frame_id: int | str,
        capture_ts: float | None,
        score: float,
        decision: str | None,
        threshold: float,
        model_id: str | None,
        model_version: str | None,
    ) -> bool:
        """Maybe capture one inspected frame; True when it was queued. Never blocks, never raises."""
        p, reason = capture_probability(self.options, camera_id, decision, score, threshold)
        if p <= 0.0 or (p < 1.0 and self._rng.random() >= p):
            return False
        nbytes = int(image.nbytes)
        with self._lock:
            if self._closing:
                return False
            if self._pending_bytes + nbytes > self._queue_bytes_limit:
                self.metrics.dropped.inc(reason="queue_full")
                return False
            self._pending += 1
            self._pending_bytes += nbytes
        meta = {
            "camera": camera_id, "frame_id": frame_id, "time": round(time.time(), 3), "capture_ts": capture_ts,
            "score": float(score), "decision": decision, "threshold": float(threshold), "model_id": model_id,
            "model_version": model_version, "reason": reason, "p": p,
        }
        try:
            # The daemon never modifies a decoded frame after inference, so no copy is needed.
            self._queue.put_nowait(_Capture(image, meta))
        except queue.Full:
            self._settle(nbytes)
            self.metrics.dropped.inc(reason="queue_full")
            return False
        self.metrics.queue_depth.set(self._queue.qsize())
        return True

    def _settle(self, nbytes: int) -> None:
        with self._lock:
            self._pending -= 1
            self._pending_bytes -= nbytes
            self._lock.notify_all()

    # --------------------------------------------------------------------------------- writer

    def _writer_loop(self) -> None:
        _lower_thread_priority()
        while True:
            item = self._queue.get()
            if item is None:
                break
            nbytes = int(item.image.nbytes)
            try:
                if self._abandon.is_set():
                    self.metrics.dropped.inc(reason="shutdown")
                else:
                    self._write(item)
            except Exception as err:  # noqa: BLE001 - a full disk must not take the daemon down
                self.metrics.dropped.inc(reason="write_error")
                self._error_log.log(logging.ERROR, "write", "capture_write_failed", error=repr(err))
            finally:
                self._settle(nbytes)
                self.metrics.queue_depth.set(self._queue.qsize())
        # An offer that raced with stop() can sit behind the sentinel: count it, never lose it silently.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.metrics.dropped.inc(reason="shutdown")
                self._settle(int(item.image.nbytes))

    def _write(self, item: _Capture) -> None:
        meta = item.meta
        self._seq += 1
        name = frame_file_name(meta["time"], meta["camera"], meta["frame_id"], self._seq)
        data = encode_png(item.image)
        write_atomically(self.frames_dir, name, data, self.options.fsync)
        height, width = item.image.shape[:2]
        line = json.dumps({"file": name, **meta, "height": int(height), "width": int(width)}) + "\n"
        with open(self.manifest_path, "a", encoding="utf-8") as handle:
            handle.write(line)
        self._files.append((name, len(data)))
        self._pool_bytes += len(data)
        self._live_lines += 1
        self.metrics.saved.inc(camera=meta["camera"], reason=meta["reason"])
        self._evict()

    def _evict(self) -> None:
        # Runs on the writer thread only (and in start() before any write), so no lock is needed.
        while self._pool_bytes > self._quota_bytes and self._files:
            name, size = self._files.popleft()
            with contextlib.suppress(FileNotFoundError):
                (self.frames_dir / name).unlink()
            self._pool_bytes -= size
            self._live_lines -= 1
            self._dead_lines += 1
            self.metrics.evicted.inc()
        self.metrics.pool_bytes.set(self._pool_bytes)
        if self._dead_lines >= COMPACT_MIN_DEAD and self._dead_lines > self._live_lines:
            self._compact_manifest()

    def _compact_manifest(self) -> None:
        live = {name for name, _ in self._files}
        kept = [line for line, entry in manifest_lines(self.manifest_path) if entry.get("file") in live]
        write_atomically(self.pool_dir, MANIFEST_NAME, "".join(kept).encode(), self.options.fsync)
        self._dead_lines = 0
        self._live_lines = len(kept)

    def stats(self) -> dict[str, Any]:
        return {
            "pool": str(self.pool_dir),
            "frames": len(self._files),
            "pool_bytes": self._pool_bytes,
            "queued": self._queue.qsize(),
            "saved": self.metrics.saved.total(),
            "dropped": {key[0]: value for key, value in self.metrics.dropped.items().items()},
            "evicted": self.metrics.evicted.total(),
        }


def _lower_thread_priority() -> None:
    # On Linux, setpriority on a thread id changes that thread only: PNG encoding then yields the CPU
    # to the inference thread. Elsewhere (or without permission) the writer keeps normal priority.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
