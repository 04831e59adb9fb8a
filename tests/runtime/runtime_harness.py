"""Helpers for the runtime tests: the "contract test model", bundles, frames, a ZeroMQ client.

The contract test model is a tiny deterministic ONNX graph honouring the bundle graph contract
(llb_edge.bundle): uint8 [B, H, W, 3] in; anomaly_map = per-pixel mean over channels of
|x/255 - 0.5|, average-pooled to M x M; score = mean of the top 1% of map cells; score_max = map max.
A flat mid-grey frame therefore scores ~0.002 (OK) and a white square scores 0.5 (NG) with a map
that is hot exactly under the square, so decisions and defect boxes can be checked exactly.
It stands in until the exporter writes real bundles (tests with a real tiny Dinomaly come later).

Every socket here has a timeout, so a broken daemon fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from llb_edge.bundle import (
    BundleManifest,
    ModelFile,
    Preprocessing,
    Threshold,
    sha256_file,
    utc_now,
    write_manifest,
)
from llb_edge.protocol import (
    FrameHeader,
    Heartbeat,
    ResultHeader,
    decode_published,
    encode_frame,
    raw_frame_header,
)
from llb_edge.runtime.daemon import Daemon, ServeOptions
from llb_edge.runtime.keys import configure_client
from llb_edge.runtime.supervise import DaemonProcess

REPO = Path(__file__).resolve().parents[2]
ANY_PORT = "tcp://127.0.0.1:*"

RESIZE = 72
CROP = 64
MAP_SIZE = 16
THRESHOLD = 0.1
SCORE_RANGE = [0.0, 0.5]  # map values are |x/255 - 0.5| averaged: never outside [0, 0.5]


def export_contract_model(path: Path, *, nan: bool = False, fixed_batch: int | None = None) -> Path:
    """Export the contract test model (``nan``: a broken variant whose outputs are all NaN)."""
    import torch

    class ContractTestModel(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x = images.permute(0, 3, 1, 2).float() / 255.0
            deviation = (x - 0.5).abs().mean(dim=1, keepdim=True)
            anomaly_map = torch.nn.functional.avg_pool2d(deviation, CROP // MAP_SIZE)
            if nan:
                anomaly_map = anomaly_map * float("nan")
            flat = anomaly_map.flatten(1)
            top = max(1, MAP_SIZE * MAP_SIZE // 100)
            score = torch.topk(flat, top, dim=1).values.mean(dim=1)
            return anomaly_map, score, flat.amax(dim=1)

    example = torch.zeros(fixed_batch or 2, CROP, CROP, 3, dtype=torch.uint8)
    names = ["anomaly_map", "score", "score_max"]
    dynamic = None if fixed_batch else {name: {0: "batch"} for name in ["images", *names]}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but exports this graph in 0.1 s instead of 4 s.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ContractTestModel().eval(),
            (example,),
            str(path),
            input_names=["images"],
            output_names=names,
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    return path


def make_bundle(
    root: Path,
    onnx_path: Path,
    *,
    model_version: str = "1",
    threshold: float = THRESHOLD,
    extra: dict | None = None,
    resize: int = RESIZE,
) -> Path:
    """A bundle folder holding ``onnx_path`` as model.onnx, with a manifest that verifies.

    ``resize``: RESIZE centre-crops CROP out of it (the paper's pre-processing); CROP inspects the whole frame.
    """
    root.mkdir(parents=True, exist_ok=True)
    target = root / "model.onnx"
    shutil.copyfile(onnx_path, target)
    manifest = BundleManifest(
        model_id="contract-test-model",
        model_version=model_version,
        created=utc_now(),
        source_run="tests",
        encoder="none",
        weights_sha256="0" * 64,
        preprocessing=Preprocessing(resize=resize, crop=CROP),
        map_size=MAP_SIZE,
        outputs={"anomaly_map": ["B", 1, MAP_SIZE, MAP_SIZE], "score": ["B"], "score_max": ["B"]},
        score_stats={},
        threshold=Threshold(value=threshold, method="tests", set_by="tests", set_at=utc_now()),
        files={"onnx": ModelFile(path="model.onnx", sha256=sha256_file(target), format="onnx", precision="fp32")},
        extra={"score_range": SCORE_RANGE, **(extra or {})},
    )
    write_manifest(root, manifest)
    return root


# ------------------------------------------------------------------------------------------ frames

GREY = 128


def flat_frame(height: int, width: int, value: int = GREY) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


def square_frame(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A grey frame with a white rectangle at box = (x, y, w, h), in original pixels."""
    frame = flat_frame(height, width)
    x, y, w, h = box
    frame[y : y + h, x : x + w] = 255
    return frame


def cell_size_px(height: int, width: int) -> float:
    """One anomaly-map cell in original pixels: the precision a defect box can have."""
    return max(width, height) / RESIZE * (CROP / MAP_SIZE)


def assert_box_close(found: tuple[int, int, int, int], expected: tuple[int, int, int, int], tolerance: float) -> None:
    fx, fy, fw, fh = found
    ex, ey, ew, eh = expected
    edges_found = (fx, fy, fx + fw, fy + fh)
    edges_expected = (ex, ey, ex + ew, ey + eh)
    for got, want in zip(edges_found, edges_expected, strict=True):
        assert abs(got - want) <= tolerance, f"box {found} is not within {tolerance:.1f} px of {expected}"


def encoded(rgb: np.ndarray, encoding: str) -> bytes:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg" if encoding == "jpeg" else ".png", bgr)
    assert ok
    return data.tobytes()


def frame_parts(camera_id: str, frame_id: int | str, rgb: np.ndarray, encoding: str = "raw") -> list[Any]:
    if encoding == "raw":
        return encode_frame(raw_frame_header(camera_id, frame_id, rgb, time.time()), rgb)
    header = FrameHeader(camera_id=camera_id, frame_id=frame_id, encoding=encoding, capture_ts=time.time())
    return encode_frame(header, encoded(rgb, encoding))


def header_bytes(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# ---------------------------------------------------------------------------------------- daemons


def daemon_options(**overrides: Any) -> ServeOptions:
    """Options for an in-process test daemon: random loopback ports, fast heartbeats, 1 ORT thread."""
    values: dict[str, Any] = {
        "intake": ANY_PORT,
        "results": ANY_PORT,
        "control": ANY_PORT,
        "health_port": None,
        "heartbeat_s": 0.05,
        "max_wait_ms": 1.0,
        "ort_threads": 1,
    }
    values.update(overrides)
    return ServeOptions(**values)


@contextlib.contextmanager
def running_daemon(bundle: Path, **overrides: Any) -> Iterator[Daemon]:
    daemon = Daemon(bundle, daemon_options(**overrides)).start()
    try:
        yield daemon
    finally:
        daemon.stop(timeout_s=10)


class Client:
    """A camera (PUSH) and a results subscriber (SUB) talking to one daemon."""

    def __init__(
        self,
        intake: str,
        results: str,
        *,
        curve_secret: Path | None = None,
        server_public: Path | None = None,
        subscribe: bool = True,
    ) -> None:
        self.context = zmq.Context()
        self.push = self.context.socket(zmq.PUSH)
        self.push.linger = 0
        self.push.sndtimeo = 2000
        self.sub = self.context.socket(zmq.SUB)
        self.sub.linger = 0
        self.sub.rcvtimeo = 100
        if curve_secret is not None and server_public is not None:
            configure_client(self.push, curve_secret, server_public)
            configure_client(self.sub, curve_secret, server_public)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.push.connect(intake)
        self.sub.connect(results)
        self.heartbeats: list[Heartbeat] = []
        if subscribe:
            self.wait_for_heartbeat()

    @classmethod
    def of(cls, daemon: Daemon, **kwargs: Any) -> Client:
        return cls(daemon.endpoints["intake"], daemon.endpoints["results"], **kwargs)

    def wait_for_heartbeat(self, timeout_s: float = 5.0) -> Heartbeat:
        """A heartbeat proves the subscription is live: results sent after it are not lost."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = self._receive()
            if isinstance(message, Heartbeat):
                return message
        raise AssertionError(f"no heartbeat within {timeout_s} s")

    def send(self, parts: list[Any]) -> None:
        self.push.send_multipart(parts, copy=False)

    def send_frame(self, camera_id: str, frame_id: int | str, rgb: np.ndarray, encoding: str = "raw") -> None:
        self.send(frame_parts(camera_id, frame_id, rgb, encoding))

    def _receive(self) -> Heartbeat | tuple[ResultHeader, np.ndarray | None] | None:
        try:
            parts = self.sub.recv_multipart()
        except zmq.Again:
            return None
        message = decode_published(parts)
        if isinstance(message, Heartbeat):
            self.heartbeats.append(message)
        return message

    def results(self, count: int, timeout_s: float = 10.0) -> list[tuple[ResultHeader, np.ndarray | None]]:
        """Exactly ``count`` results (fails if they do not arrive in time)."""
        found: list[tuple[ResultHeader, np.ndarray | None]] = []
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            message = self._receive()
            if isinstance(message, tuple):
                found.append(message)
        assert len(found) == count, f"expected {count} results, got {len(found)} within {timeout_s} s"
        return found

    def headers(self, count: int, timeout_s: float = 10.0) -> list[ResultHeader]:
        return [header for header, _ in self.results(count, timeout_s)]

    def quiet(self, seconds: float) -> list[ResultHeader]:
        """Results that arrive within ``seconds`` (for checking that nothing does)."""
        found = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            message = self._receive()
            if isinstance(message, tuple):
                found.append(message[0])
        return found

    def close(self) -> None:
        self.push.close(linger=0)
        self.sub.close(linger=0)
        self.context.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(condition: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# ------------------------------------------------------------------------------ daemon processes


def daemon_process(args: list[str], *, block_torch: bool = False) -> DaemonProcess:
    """`llb-edge serve ARGS` in a subprocess; with ``block_torch`` torch cannot be imported in it."""
    if block_torch:
        # sys.modules["torch"] = None makes every `import torch` fail, as on a line PC without it.
        program = (
            "import sys; sys.modules['torch'] = None; "
            "from llb_edge.cli import main; sys.argv[0] = 'llb-edge'; sys.exit(main())"
        )
        command = [sys.executable, "-c", program, "serve", *args]
    else:
        command = [sys.executable, "-m", "llb_edge.cli", "serve", *args]
    return DaemonProcess(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
