"""`llb-edge replay`: a camera simulator streaming a folder of images or a video as protocol frames.

Frames go out on a PUSH socket connected to the daemon's intake, paced at ``fps``. A PUSH socket
blocks when the daemon is not keeping up (back-pressure, like a real frame grabber's buffer); a
frame that cannot be handed over within ``send_timeout_s`` is counted as not sent and the replay
moves on, as a camera would.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from llb_edge.data.images import read_image_rgb
from llb_edge.protocol import DEFAULT_INTAKE, ENCODINGS, FrameHeader, encode_frame, raw_frame_header
from llb_edge.runtime.keys import configure_client

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class ReplayStats:
    sent: int
    not_sent: int  # the daemon did not take them within send_timeout_s
    seconds: float

    @property
    def fps(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def _folder_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _video_frames(path: Path) -> Iterator[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise OSError(f"OpenCV cannot open video {path}")
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                return
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


def source_frames(path: str | Path, loop: bool = False) -> Iterator[np.ndarray]:
    """uint8 RGB frames from a folder of images (sorted by name) or a video file."""
    path = Path(path)
    if path.is_dir():
        files = _folder_images(path)
        passes = itertools.count() if loop else range(1)
        for _ in passes:
            for file in files:
                yield read_image_rgb(file)
        return
    if not path.is_file():
        raise FileNotFoundError(f"{path} is neither a folder of images nor a video file")
    while True:
        produced = False
        for frame in _video_frames(path):
            produced = True
            yield frame
        if not loop or not produced:
            return


def encode_rgb_frame(
    camera_id: str, frame_id: int, rgb: np.ndarray, encoding: str, jpeg_quality: int = 90
) -> list[Any]:
    """Message parts for one RGB frame in the given encoding."""
    capture_ts = time.time()
    if encoding == "raw":
        return encode_frame(raw_frame_header(camera_id, frame_id, rgb, capture_ts), rgb)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if encoding == "jpeg" else []
    ok, data = cv2.imencode(".jpg" if encoding == "jpeg" else ".png", bgr, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {rgb.shape} frame as {encoding}")
    header = FrameHeader(camera_id=camera_id, frame_id=frame_id, encoding=encoding, capture_ts=capture_ts)
    return encode_frame(header, data.tobytes())


def replay(
    path: str | Path,
    endpoint: str = DEFAULT_INTAKE,
    *,
    fps: float = 10.0,
    camera_id: str = "cam0",
    encoding: str = "raw",
    loop: bool = False,
    count: int | None = None,
    first_frame_id: int = 0,
    jpeg_quality: int = 90,
    send_timeout_s: float = 1.0,
    linger_s: float = 2.0,
    curve_secret: str | Path | None = None,
    curve_server_public: str | Path | None = None,
    context: zmq.Context | None = None,
) -> ReplayStats:
    """Stream ``path`` (image folder or video) to ``endpoint`` as camera ``camera_id``.

    ``fps`` <= 0 sends as fast as the daemon takes them. ``count`` stops after that many frames
    (with ``loop`` the source repeats until then, or forever when ``count`` is None). Frame ids
    count up from ``first_frame_id``. CURVE is used when both ``curve_secret`` (this client's
    .key_secret) and ``curve_server_public`` (the daemon's .key) are given.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.sndhwm = 16
    sock.sndtimeo = int(send_timeout_s * 1000)
    sock.linger = int(linger_s * 1000)  # let the last frames reach the daemon after we return
    if curve_secret is not None and curve_server_public is not None:
        configure_client(sock, curve_secret, curve_server_public)
    sock.connect(endpoint)
    interval = 1.0 / fps if fps > 0 else 0.0
    sent = not_sent = 0
    started = time.perf_counter()
    next_send = started
    try:
        frames = source_frames(path, loop=loop)
        for frame_id, rgb in zip(itertools.count(first_frame_id), frames, strict=False):
            if count is not None and sent + not_sent >= count:
                break
            if interval:
                delay = next_send - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                next_send += interval
            try:
                sock.send_multipart(encode_rgb_frame(camera_id, frame_id, rgb, encoding, jpeg_quality), copy=False)
                sent += 1
            except zmq.Again:
                not_sent += 1
    finally:
        sock.close()
    return ReplayStats(sent=sent, not_sent=not_sent, seconds=time.perf_counter() - started)
