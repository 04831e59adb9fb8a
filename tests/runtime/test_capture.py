"""Frame capture into the retrain pool: sampling, quota eviction, atomic files, never blocking inference."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from runtime_harness import Client, flat_frame, running_daemon, square_frame

from llb_edge.data.images import read_image_rgb
from llb_edge.pool import FRAMES_DIR, IMAGE_GLOB, read_pool
from llb_edge.runtime import capture as capture_module
from llb_edge.runtime.capture import CaptureOptions, FrameCapture, capture_probability, parse_camera_rates
from llb_edge.runtime.health import MetricsRegistry, parse_prometheus_text

pytest_plugins = ["runtime_fixtures"]  # contract-test-model bundles
pytestmark = pytest.mark.timeout(60)


def offer(cap: FrameCapture, image: np.ndarray, frame_id: int, camera: str = "cam-a", score: float = 0.01,
          decision: str = "OK", threshold: float = 0.1) -> bool:
    return cap.offer(image, camera_id=camera, frame_id=frame_id, capture_ts=None, score=score, decision=decision,
                     threshold=threshold, model_id="m", model_version="1")


def noise(size: int, seed: int) -> np.ndarray:
    """Incompressible pixels, so PNG sizes are predictable (about 3 * size**2 bytes)."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture
def started(tmp_path: Path):
    caps: list[FrameCapture] = []

    def start(**options: object) -> FrameCapture:
        cap = FrameCapture(CaptureOptions(pool_dir=tmp_path / "pool", seed=0, **options)).start()  # type: ignore[arg-type]
        caps.append(cap)
        return cap

    yield start
    for cap in caps:
        cap.stop(5)


def test_capture_probability_rules() -> None:
    options = CaptureOptions(pool_dir=Path("p"), rate=0.1, camera_rates={"cam-b": 0.0}, ng_rate=0.5, band=0.2,
                             band_rate=0.8)
    assert capture_probability(options, "cam-a", "OK", 0.01, 0.1) == (0.1, "sample")
    assert capture_probability(options, "cam-b", "OK", 0.01, 0.1) == (0.0, "sample")
    assert capture_probability(options, "cam-b", "NG", 0.5, 0.1) == (0.5, "ng")
    assert capture_probability(options, "cam-a", "OK", 0.085, 0.1) == (0.8, "band")  # within 20% below
    assert capture_probability(options, "cam-a", "NG", 0.115, 0.1) == (0.8, "band")  # band beats ng here
    assert capture_probability(options, "cam-a", "OK", 0.079, 0.1) == (0.1, "sample")
    bad = CaptureOptions(pool_dir=Path("p"), rate=1.5, band=-1, queue_size=0, camera_rates={"x": -0.1})
    assert len(bad.problems()) == 4
    assert parse_camera_rates(["cam:1=0.5", "b=0"]) == {"cam:1": 0.5, "b": 0.0}
    for item in ("cam1", "=0.5", "cam1=high"):
        with pytest.raises(ValueError, match="CAMERA=RATE"):
            parse_camera_rates([item])


def test_sampling_rates_per_camera_and_extra_ng_sampling(started) -> None:
    cap = started(rate=0.25, camera_rates={"cam-b": 0.0, "cam-c": 1.0}, ng_rate=1.0, queue_size=1000)
    tiny = flat_frame(4, 4)
    taken = {cam: sum(offer(cap, tiny, i, cam) for i in range(400)) for cam in ("cam-a", "cam-b", "cam-c")}
    ng_taken = sum(offer(cap, tiny, 1000 + i, "cam-b", score=0.5, decision="NG") for i in range(20))
    assert cap.wait_idle(20)
    assert 60 <= taken["cam-a"] <= 140  # binomial(400, 0.25): mean 100, sd 8.7
    assert taken["cam-b"] == 0 and taken["cam-c"] == 400 and ng_taken == 20
    frames = read_pool(cap.pool_dir)
    assert len(frames) == taken["cam-a"] + 400 + 20
    by_reason = {f.reason for f in frames if f.camera == "cam-b"}
    assert by_reason == {"ng"} and all(f.p == 1.0 for f in frames if f.camera == "cam-b")
    sampled = [f for f in frames if f.camera == "cam-a"]
    assert all(f.p == 0.25 and f.weight == 4.0 and f.reason == "sample" for f in sampled)
    assert cap.metrics.saved.value(camera="cam-b", reason="ng") == 20


def test_quota_evicts_oldest_first_also_across_restarts(started) -> None:
    size = 64  # ~12 KiB of noise per PNG
    frame_bytes = len(capture_module.encode_png(noise(size, 0)))
    quota_mb = 3.5 * frame_bytes / 2**20  # room for 3 frames
    cap = started(rate=1.0, quota_mb=quota_mb, queue_size=100)
    for i in range(8):
        offer(cap, noise(size, i), i)
    assert cap.wait_idle(10)
    frames = read_pool(cap.pool_dir)
    assert [f.frame_id for f in frames] == [5, 6, 7]  # the newest three
    assert cap.metrics.evicted.total() == 5
    assert cap.stats()["pool_bytes"] == sum(f.path.stat().st_size for f in frames)
    cap.stop(5)

    # A restart finds the frames already there and a lower quota applies at once, oldest first.
    smaller = started(rate=1.0, quota_mb=1.5 * frame_bytes / 2**20)
    assert [f.frame_id for f in read_pool(smaller.pool_dir)] == [7]
    offer(smaller, noise(size, 8), 8)
    assert smaller.wait_idle(10)
    assert [f.frame_id for f in read_pool(smaller.pool_dir)] == [8]


def test_frames_appear_atomically(tmp_path: Path, started, monkeypatch: pytest.MonkeyPatch) -> None:
    frames_dir = tmp_path / "pool" / FRAMES_DIR
    seen_at_replace = []
    real_replace = os.replace

    def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        # The moment before the rename: the data is complete in the temp file, yet nothing matches.
        if Path(dst).suffix == ".png":
            seen_at_replace.append((Path(src).name, Path(src).stat().st_size, sorted(frames_dir.glob(IMAGE_GLOB))))
        real_replace(src, dst)

    monkeypatch.setattr(capture_module.os, "replace", replace)
    cap = started(rate=1.0, queue_size=100, fsync=True)
    images = [noise(300, i) for i in range(6)]
    stop = threading.Event()
    problems: list[str] = []
    checked = [0]

    def lister() -> None:
        # Everything a reader can list must be a complete image: read each one back in full.
        while not stop.is_set():
            for path in frames_dir.glob(IMAGE_GLOB):
                if path.name.startswith(".") or not path.name.endswith(".png"):
                    problems.append(f"temp name listed: {path.name}")
                try:
                    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
                except cv2.error as err:
                    problems.append(f"{path.name}: {err}")
                    continue
                if image is None or image.shape != (300, 300, 3):
                    problems.append(f"{path.name}: incomplete ({None if image is None else image.shape})")
                checked[0] += 1

    thread = threading.Thread(target=lister)
    thread.start()
    for i, image in enumerate(images):
        offer(cap, image, i)
    assert cap.wait_idle(30)
    stop.set()
    thread.join(10)
    assert not problems
    assert checked[0] > 0
    assert len(seen_at_replace) == 6
    for index, (temp_name, temp_size, listed) in enumerate(seen_at_replace):
        assert temp_name.startswith(".") and temp_name.endswith(".tmp") and temp_size > 300 * 300 * 3 * 0.9
        assert len(listed) == index  # only the frames already finished are visible
    assert not [p for p in frames_dir.iterdir() if p.name.startswith(".")]  # no temp left behind
    for frame, image in zip(read_pool(cap.pool_dir), images, strict=True):
        assert np.array_equal(read_image_rgb(frame.path), image)  # lossless, original size


def test_a_slow_writer_drops_captures_without_blocking_offer(started, monkeypatch: pytest.MonkeyPatch) -> None:
    real_encode = capture_module.encode_png

    def slow_encode(image: np.ndarray) -> bytes:
        time.sleep(0.2)
        return real_encode(image)

    monkeypatch.setattr(capture_module, "encode_png", slow_encode)
    cap = started(rate=1.0, queue_size=2)
    durations, queued = [], 0
    for i in range(50):
        t0 = time.perf_counter()
        queued += offer(cap, flat_frame(32, 32), i)
        durations.append(time.perf_counter() - t0)
    assert max(durations) < 0.05  # offer never waits for the writer
    assert cap.wait_idle(10)
    dropped = cap.metrics.dropped.value(reason="queue_full")
    assert queued <= 4 and dropped == 50 - queued
    assert len(read_pool(cap.pool_dir)) == queued
    # Queued bytes are bounded too: a frame bigger than queue_mb is dropped outright.
    big = started(rate=1.0, queue_mb=0.001)
    assert not offer(big, flat_frame(64, 64), 0)
    assert big.metrics.dropped.value(reason="queue_full") == 1


def test_daemon_capture_never_blocks_inference(
    tmp_path: Path, bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_s = 0.5
    real_encode = capture_module.encode_png

    def slow_encode(image: np.ndarray) -> bytes:
        time.sleep(write_s)
        return real_encode(image)

    monkeypatch.setattr(capture_module, "encode_png", slow_encode)
    pool = tmp_path / "pool"
    options = CaptureOptions(pool_dir=pool, rate=1.0, queue_size=1, seed=0)
    total = 120
    with running_daemon(bundle_dir, capture=options, queue_size=total, health_port=0) as daemon, \
            Client.of(daemon) as client:
        started = time.monotonic()
        for frame_id in range(total):
            rgb = square_frame(64, 64, (8, 8, 24, 24)) if frame_id % 4 == 0 else flat_frame(64, 64)
            client.send_frame("cam-a", frame_id, rgb)
        headers = client.headers(total, timeout_s=20)
        elapsed = time.monotonic() - started
        import urllib.request

        with urllib.request.urlopen(f"{daemon.health_url}/metrics", timeout=5) as response:
            samples = parse_prometheus_text(response.read().decode())
        assert samples['llb_capture_dropped_total{reason="queue_full"}'] > 0
        assert daemon.status()["capture"]["dropped"]["queue_full"] > 0
    assert sorted(h.frame_id for h in headers) == list(range(total)) and all(h.ok for h in headers)
    # Writing every frame would take total * write_s = 60 s; inspection did not wait for it.
    assert elapsed < total * write_s / 4
    assert max(h.latency_ms["total"] for h in headers) < write_s * 1000
    assert daemon.capture is not None
    dropped = daemon.capture.metrics.dropped.value(reason="queue_full")
    assert dropped > total / 2
    # After the stop (which flushes what was queued): every frame was saved or counted as dropped.
    assert len(read_pool(pool)) + dropped == total == daemon.capture.metrics.saved.total() + dropped


def test_pool_frames_are_the_inspected_pixels_with_their_result(tmp_path: Path, bundle_dir: Path) -> None:
    pool = tmp_path / "pool"
    gray = np.repeat(np.arange(90 * 120, dtype=np.uint32).reshape(90, 120, 1) % 251, 3, axis=2).astype(np.uint8)
    colour = square_frame(70, 50, (5, 5, 20, 20))
    colour[..., 1] = 17
    with running_daemon(bundle_dir, capture=CaptureOptions(pool_dir=pool, rate=1.0)) as daemon, \
            Client.of(daemon) as client:
        client.send_frame("cam:1", "lot/7", gray, "png")
        client.send_frame("cam:1", 8, colour)
        headers = {h.frame_id: h for h in client.headers(2)}
        assert daemon.capture is not None and daemon.capture.wait_idle(10)
    frames = {f.frame_id: f for f in read_pool(pool)}
    assert set(frames) == {"lot/7", 8}
    for frame_id, image in (("lot/7", gray), (8, colour)):
        frame, header = frames[frame_id], headers[frame_id]
        assert np.array_equal(read_image_rgb(frame.path), image)
        assert frame.camera == "cam:1" and frame.model_version == "1" and frame.decision == header.decision
        assert frame.score == pytest.approx(header.score) and frame.threshold == pytest.approx(0.1)
        assert ":" not in frame.file and "/" not in frame.file
    assert frames[8].decision == "NG"
    assert cv2.imread(str(frames["lot/7"].path), cv2.IMREAD_UNCHANGED).ndim == 2  # gray stored as one channel


def test_capture_metrics_are_registered_once() -> None:
    registry = MetricsRegistry()
    FrameCapture(CaptureOptions(pool_dir=Path("unused")), registry)
    text = registry.render()
    for name in ("llb_capture_saved_total", "llb_capture_dropped_total", "llb_capture_evicted_total",
                 "llb_capture_pool_bytes", "llb_capture_queue_depth"):
        assert f"# TYPE {name}" in text
