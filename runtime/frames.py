"""From a validated frame message to a model input, and the per-camera keep-newest queues.

The reader thread does the decoding and resizing here, before queueing, so a queued frame is
already the small crop the model takes (queues hold little memory) and the inference thread does
nothing but batch, run and post-process.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

from llb_edge.data.images import ImageReadError, decode_image_bytes
from llb_edge.data.transforms import Geometry
from llb_edge.protocol import ErrorCode, FrameHeader, ProtocolError, raw_payload_to_array
from llb_edge.runtime.image_header import ImageHeaderError, read_image_header
from llb_edge.runtime.roi import RegionOfInterest

DEFAULT_MAX_PIXELS = 64_000_000  # a frame bigger than this is refused (JPEG/PNG bombs)
# A frame's pixel buffer (raw as sent, JPEG/PNG as the decoder outputs it) may take at most
# max_pixels of 8-bit RGBA: 8-bit frames are bounded by their pixels, 16-bit ones count double.
MAX_BYTES_PER_PIXEL = 4
# A camera silent this long gives up its slot (of max_cameras): long enough for a short line stop,
# short enough that a replaced or renamed camera gets a slot without a daemon restart.
DEFAULT_CAMERA_IDLE_S = 300.0


def raw_to_rgb8(image: np.ndarray) -> np.ndarray:
    """A raw frame (RGB order; gray, RGB or RGBA; uint8 or uint16) as uint8 HxWx3 RGB.

    uint16 uses the same fixed full-range scaling as llb_edge.data.images, so a 16-bit camera on
    the line sees the mapping the model was trained with.
    """
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3])
    return image


def _check_frame_size(header: FrameHeader, height: int, width: int, buffer_bytes: int, max_pixels: int) -> None:
    """ProtocolError(TOO_LARGE) when a frame's pixels or pixel buffer are over the limits."""
    if height * width > max_pixels:
        raise ProtocolError.for_frame(header, ErrorCode.TOO_LARGE, f"{height}x{width} is over {max_pixels} pixels")
    max_bytes = MAX_BYTES_PER_PIXEL * max_pixels
    if buffer_bytes > max_bytes:
        raise ProtocolError.for_frame(
            header,
            ErrorCode.TOO_LARGE,
            f"{height}x{width} takes {buffer_bytes} bytes as pixels, over {max_bytes} "
            f"({MAX_BYTES_PER_PIXEL} bytes x {max_pixels} pixels)",
        )


def decode_frame_image(header: FrameHeader, payload: memoryview, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The frame's pixels as uint8 HxWx3 RGB; ProtocolError(DECODE_FAILED | TOO_LARGE) if not.

    A JPEG/PNG payload must be a file of its label's format, and its size is read from the file
    header and checked before the decoder allocates anything.
    """
    if header.encoding == "raw":
        assert header.shape is not None  # decode_frame guarantees it for raw
        _check_frame_size(header, header.shape[0], header.shape[1], header.expected_raw_bytes(), max_pixels)
        return raw_to_rgb8(raw_payload_to_array(header, payload))
    try:
        info = read_image_header(payload, header.encoding)
    except ImageHeaderError as err:
        raise ProtocolError.for_frame(header, ErrorCode.DECODE_FAILED, err.reason) from err
    _check_frame_size(header, info.height, info.width, info.decoded_bytes, max_pixels)
    try:
        return decode_image_bytes(payload, name=f"{header.encoding} frame {header.camera_id}/{header.frame_id}")
    except ImageReadError as err:
        raise ProtocolError.for_frame(header, ErrorCode.DECODE_FAILED, err.reason) from err


@dataclass
class Frame:
    """A decoded frame waiting for inference."""

    header: FrameHeader
    image: np.ndarray  # original uint8 RGB; kept so a reload to another input size can redo the crop
    model_input: np.ndarray  # uint8 crop x crop x 3 for ``geometry``, made from the inspected part
    geometry: Geometry
    received: float  # perf_counter when the message arrived
    decode_s: float  # parse + decode + resize/crop
    enqueued: float = 0.0
    roi: RegionOfInterest | None = None  # the camera's region of interest (checked to fit); None: whole frame

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def input_for(self, geometry: Geometry) -> np.ndarray:
        if geometry != self.geometry:
            inspected = self.roi.cut(self.image) if self.roi is not None else self.image
            self.model_input = geometry.to_model_input(inspected)
            self.geometry = geometry
        return self.model_input


class FrameQueues:
    """Per-camera bounded FIFO queues with a keep-newest policy, and batch assembly.

    When a camera's queue is full the oldest frame is evicted and returned to the caller (which
    answers it with a DROPPED result): on a live line the newest frame is the one worth inspecting,
    and waiting for old ones only adds latency. Memory stays bounded by
    ``capacity * max_cameras`` frames.

    A camera whose queue is empty and that sent nothing for ``idle_s`` seconds is forgotten (its
    slot freed): by :meth:`expire_idle`, and at once when a new camera finds every slot taken.
    """

    def __init__(self, capacity: int, max_cameras: int, idle_s: float = DEFAULT_CAMERA_IDLE_S) -> None:
        if capacity < 1 or max_cameras < 1 or idle_s <= 0:
            raise ValueError("queue capacity and max_cameras must be >= 1, idle_s > 0")
        self.capacity = capacity
        self.max_cameras = max_cameras
        self.idle_s = idle_s
        self._last_put: dict[str, float] = {}  # camera -> monotonic time of its last frame
        self._expired: list[str] = []  # expired by put(), not yet reported by expire_idle()
        self._queues: dict[str, deque[Frame]] = {}
        self._order: list[str] = []  # round-robin order so one busy camera cannot starve the others
        self._next = 0
        self._cond = threading.Condition()
        self._closed = False
        self.peak_depth = 0  # the largest single-camera depth ever seen (a test of the bound)

    def put(self, frame: Frame) -> Frame | None:
        """Queue ``frame``; returns the evicted oldest frame when the camera's queue was full."""
        camera = frame.header.camera_id
        with self._cond:
            queue = self._queues.get(camera)
            if queue is None:
                if len(self._queues) >= self.max_cameras:
                    self._expire_idle_locked()
                if len(self._queues) >= self.max_cameras:
                    raise ProtocolError.for_frame(
                        frame.header, ErrorCode.TOO_MANY_CAMERAS,
                        f"already serving {self.max_cameras} cameras (a camera's slot is freed after "
                        f"{self.idle_s:g} s without frames)",
                    )
                queue = self._queues[camera] = deque()
                self._order.append(camera)
            self._last_put[camera] = time.monotonic()
            evicted = queue.popleft() if len(queue) >= self.capacity else None
            frame.enqueued = time.perf_counter()
            queue.append(frame)
            self.peak_depth = max(self.peak_depth, len(queue))
            self._cond.notify()
        return evicted

    def expire_idle(self) -> list[str]:
        """Forget cameras idle for ``idle_s`` with nothing queued; returns every camera forgotten
        since the last call (put() also forgets them when a new camera needs a slot)."""
        with self._cond:
            self._expire_idle_locked()
            expired, self._expired = self._expired, []
        return expired

    def _expire_idle_locked(self) -> None:
        cutoff = time.monotonic() - self.idle_s
        idle = [camera for camera, queue in self._queues.items() if not queue and self._last_put[camera] <= cutoff]
        if idle:
            for camera in idle:
                del self._queues[camera], self._last_put[camera]
            self._order = [camera for camera in self._order if camera in self._queues]
            self._next = self._next % len(self._order) if self._order else 0
            self._expired += idle

    def depths(self) -> dict[str, int]:
        with self._cond:
            return {camera: len(queue) for camera, queue in self._queues.items()}

    def total(self) -> int:
        with self._cond:
            return self._total_locked()

    def _total_locked(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def close(self) -> None:
        """Stop waiting for more frames: take_batch returns what is queued without delay."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take_batch(self, max_batch: int, max_wait_s: float, idle_timeout_s: float = 0.1) -> list[Frame]:
        """Up to ``max_batch`` frames, round-robin across cameras.

        Waits up to ``idle_timeout_s`` for a first frame (so the caller can check for shutdown),
        then up to ``max_wait_s`` after the oldest queued frame arrived for the batch to fill: the
        dynamic-batching trade of a little latency for throughput.
        """
        with self._cond:
            if self._total_locked() == 0 and not self._closed:
                self._cond.wait(idle_timeout_s)
            if self._total_locked() == 0:
                return []
            oldest = min(queue[0].enqueued for queue in self._queues.values() if queue)
            deadline = oldest + max_wait_s
            while not self._closed and self._total_locked() < max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._pop_round_robin(max_batch)

    def _pop_round_robin(self, max_batch: int) -> list[Frame]:
        batch: list[Frame] = []
        cameras = len(self._order)
        idle_in_a_row = 0
        while len(batch) < max_batch and idle_in_a_row < cameras:
            queue = self._queues[self._order[self._next % cameras]]
            self._next = (self._next + 1) % cameras
            if queue:
                batch.append(queue.popleft())
                idle_in_a_row = 0
            else:
                idle_in_a_row += 1
        return batch
