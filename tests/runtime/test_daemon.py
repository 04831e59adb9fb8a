"""The daemon in-process, over real ZeroMQ sockets on loopback, with real ONNX Runtime sessions."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from runtime_harness import (
    Client,
    assert_box_close,
    cell_size_px,
    encoded,
    flat_frame,
    frame_parts,
    header_bytes,
    make_bundle,
    running_daemon,
    square_frame,
)

from llb_edge.bundle import set_threshold
from llb_edge.protocol import ErrorCode
from llb_edge.runtime.control import send_control
from llb_edge.runtime.health import parse_prometheus_text

pytest_plugins = ["runtime_fixtures"]  # contract-test-model bundles
pytestmark = pytest.mark.timeout(60)


CASES = [
    # camera, size (h, w), defect box (x, y, w, h) or None, encoding
    ("cam-a", (200, 300), (120, 70, 60, 50), "raw"),
    ("cam-a", (200, 300), None, "raw"),
    ("cam-b", (480, 640), (300, 200, 100, 80), "jpeg"),
    ("cam-b", (480, 640), None, "jpeg"),
    ("cam-c", (90, 120), (30, 20, 40, 30), "png"),
    ("cam-c", (100, 100), None, "png"),
]


def _frame(size: tuple[int, int], box: tuple[int, int, int, int] | None) -> np.ndarray:
    return square_frame(*size, box) if box else flat_frame(*size)


def test_frames_of_any_size_and_encoding_get_correct_results(bundle_dir: Path) -> None:
    with running_daemon(bundle_dir, map_payload="uint8", health_port=0) as daemon, Client.of(daemon) as client:
        for frame_id, (camera, size, box, encoding) in enumerate(CASES):
            client.send_frame(camera, frame_id, _frame(size, box), encoding)
        results = {header.frame_id: (header, anomaly_map) for header, anomaly_map in client.results(len(CASES))}

        for frame_id, (camera, size, box, _) in enumerate(CASES):
            header, anomaly_map = results[frame_id]
            assert header.ok and header.camera_id == camera
            assert header.image_size == size
            assert header.threshold == pytest.approx(0.1)
            assert header.model_id == "contract-test-model" and header.model_version == "1"
            assert set(header.latency_ms) == {"decode", "queue", "infer", "post", "total"}
            assert anomaly_map is not None and anomaly_map.shape == (16, 16)
            if box is None:
                assert header.decision == "OK" and header.region is None
                assert header.score < 0.02
            else:
                assert header.decision == "NG" and header.score == pytest.approx(0.5, abs=0.02)
                assert header.region is not None
                cell = cell_size_px(*size)
                assert_box_close(header.region.bbox, box, tolerance=cell + 2)
                # Map smoothing moves the region's edge by up to one map cell either way.
                assert (box[2] - cell) * (box[3] - cell) <= header.region.area_px <= (box[2] + cell) * (box[3] + cell)

        # A gray 16-bit raw frame goes through the same conversion as training images.
        gray16 = np.full((60, 80), 128 * 257, dtype=np.uint16)
        gray16[20:40, 30:60] = 65535
        client.send_frame("cam-d", "gray16", gray16)
        (header,) = client.headers(1)
        assert header.decision == "NG" and header.region is not None
        assert_box_close(header.region.bbox, (30, 20, 30, 20), tolerance=cell_size_px(60, 80) + 2)

        _check_health_endpoints(daemon.health_url, frames=len(CASES) + 1)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _check_health_endpoints(url: str | None, frames: int) -> None:
    assert url is not None
    assert _get(url + "/live") == (200, "live\n")
    assert _get(url + "/ready") == (200, "ready\n")
    assert _get(url + "/nope")[0] == 404
    status, text = _get(url + "/metrics")
    assert status == 200
    samples = parse_prometheus_text(text)
    inspected = sum(v for k, v in samples.items() if k.startswith("llb_frames_inspected_total{"))
    assert inspected == frames
    assert samples['llb_frames_inspected_total{camera="cam-a",decision="NG"}'] == 1
    assert samples['llb_model_info{model_id="contract-test-model",model_version="1",backend="ort-cpu"}'] == 1
    assert samples["llb_messages_received_total"] == frames
    assert samples['llb_stage_latency_seconds_count{stage="infer"}'] == frames
    assert samples['llb_batch_size_bucket{le="+Inf"}'] >= 1
    assert 'llb_queue_depth{camera="cam-a"}' in samples
    assert samples["llb_ready"] == 1


def _malformed_messages(max_payload: int) -> list[tuple[list, ErrorCode, bool]]:
    """(parts, code, attributable) for one round of every kind of bad input a daemon sees."""

    def header(frame_id: int, **overrides: object) -> bytes:
        values = {"version": 1, "camera_id": "bad", "frame_id": frame_id, "encoding": "raw"}
        values.update({"dtype": "uint8", "shape": [8, 8, 3]})
        values.update(overrides)
        return header_bytes(**{k: v for k, v in values.items() if v is not None})

    pixels = bytes(8 * 8 * 3)
    jpeg = encoded(square_frame(400, 400, (10, 10, 50, 50)), "jpeg")
    small_jpeg = encoded(square_frame(200, 200, (10, 10, 50, 50)), "jpeg")
    too_big = bytes(300 * 300 * 3)
    messages = []
    for round_index in range(20):
        base = 1000 * round_index
        messages += [
            ([b"\x00\xffgarbage"], ErrorCode.BAD_HEADER, False),
            ([b"{not json", pixels], ErrorCode.BAD_HEADER, False),
            ([b'"a string"', pixels], ErrorCode.BAD_HEADER, False),
            ([header(base + 1, camera_id="bad camera!"), pixels], ErrorCode.BAD_HEADER, False),
            ([header(base + 2, version=None), pixels], ErrorCode.BAD_HEADER, True),
            ([header(base + 3, version=99), pixels], ErrorCode.UNKNOWN_VERSION, True),
            ([header(base + 4, encoding="tiff"), pixels], ErrorCode.UNKNOWN_ENCODING, True),
            ([header(base + 5)], ErrorCode.BAD_MESSAGE, True),
            ([header(base + 6), pixels, pixels], ErrorCode.BAD_MESSAGE, True),
            ([header(base + 7, shape=[8, 9, 3]), pixels], ErrorCode.BAD_SHAPE, True),
            ([header(base + 8, shape=[8, 8, 3, 1]), pixels], ErrorCode.BAD_SHAPE, True),
            ([header(base + 9, dtype="float64"), pixels], ErrorCode.BAD_DTYPE, True),
            ([header(base + 10, encoding="jpeg"), b"\xff\xd8 definitely not a jpeg"], ErrorCode.DECODE_FAILED, True),
            # Within max_pixels: a truncated JPEG over it is TOO_LARGE, its size read from its header.
            ([header(base + 11, encoding="jpeg"), small_jpeg[: len(small_jpeg) // 2]], ErrorCode.DECODE_FAILED, True),
            ([header(base + 12, encoding="png"), pixels], ErrorCode.DECODE_FAILED, True),
            ([header(base + 13, shape=[300, 300, 3]), too_big], ErrorCode.TOO_LARGE, True),
            ([header(base + 14, encoding="jpeg"), jpeg], ErrorCode.TOO_LARGE, True),  # 160k px > max_pixels
            ([header(base + 15, camera_id=f"extra-{round_index}"), pixels], ErrorCode.TOO_MANY_CAMERAS, True),
        ]
    # Over the protocol limit but under ZeroMQ's MAXMSGSIZE (2x), so the daemon sees and answers it.
    assert 2 * max_payload > len(too_big) > max_payload > len(jpeg)
    return messages


def test_hundreds_of_malformed_messages_do_not_stop_the_daemon(bundle_dir: Path) -> None:
    max_payload = 200_000
    options = {"max_payload_bytes": max_payload, "max_pixels": 100_000, "max_cameras": 3, "queue_size": 64}
    with running_daemon(bundle_dir, **options) as daemon, Client.of(daemon) as client:
        # Two cameras take slots first, so only the "bad" camera's slot is left for newcomers.
        client.send_frame("cam-a", 0, flat_frame(40, 40))
        client.send_frame("cam-b", 0, flat_frame(40, 40))
        client.headers(2)
        malformed = _malformed_messages(max_payload)
        # "bad" frames that are well-formed would take the third slot; send one so it is taken.
        client.send_frame("bad", "slot", flat_frame(40, 40))
        for parts, _, _ in malformed:
            client.send(parts)
        attributable = [code for _, code, attributed in malformed if attributed]
        headers = client.headers(1 + len(attributable), timeout_s=30)
        errors = [h for h in headers if not h.ok]
        assert sorted(h.error.code for h in errors) == sorted(attributable)
        assert all(h.camera_id in ("bad",) or h.camera_id.startswith("extra-") for h in errors)
        assert all(h.decision is None for h in errors)

        # Valid frames still get correct results afterwards.
        box = (50, 40, 40, 30)
        client.send_frame("cam-a", 1, square_frame(120, 160, box))
        client.send_frame("cam-b", 1, flat_frame(120, 160), "jpeg")
        results = {h.camera_id: h for h in client.headers(2)}
        assert results["cam-a"].decision == "NG" and results["cam-b"].decision == "OK"
        assert_box_close(results["cam-a"].region.bbox, box, tolerance=cell_size_px(120, 160) + 2)

        expected: dict[str, int] = {}
        for _, code, _ in malformed:
            expected[code.name] = expected.get(code.name, 0) + 1
        errors_by_code = {key[0]: int(value) for key, value in daemon.metrics.errors.items().items()}
        assert errors_by_code == expected
        assert daemon.metrics.messages.total() == len(malformed) + 5
        assert len(malformed) >= 300
        assert daemon.is_live()


def test_flood_keeps_newest_with_bounded_queues(bundle_dir: Path) -> None:
    # max_batch above the queue bound makes every batch wait max_wait_ms: the model falls behind.
    with running_daemon(bundle_dir, queue_size=2, max_batch=8, max_wait_ms=20) as daemon, Client.of(daemon) as client:
        sent = 300
        for frame_id in range(sent):
            client.send_frame("cam-a", frame_id, flat_frame(32, 32))
        headers = client.headers(sent, timeout_s=30)
        assert sorted(h.frame_id for h in headers) == list(range(sent))  # every frame answered once
        dropped = [h for h in headers if not h.ok]
        assert dropped and all(h.error.code is ErrorCode.DROPPED for h in dropped)
        inspected = [h.frame_id for h in headers if h.ok]
        assert inspected[-1] == sent - 1  # the newest frame is never the one dropped
        assert daemon.status()["queue_peak_depth"] <= 2
        assert daemon.metrics.drops.value(camera="cam-a") == len(dropped)
        assert daemon.metrics.errors.value(code="DROPPED") == len(dropped)


def test_threshold_is_reread_on_reload_and_can_be_overridden(bundle_dir: Path) -> None:
    with running_daemon(bundle_dir) as daemon, Client.of(daemon) as client:
        control = daemon.endpoints["control"]
        faint = flat_frame(64, 64)
        faint[:16, :16] = 180  # |180/255 - 0.5| = 0.206 under the square

        def decide(frame_id: int) -> str | None:
            client.send_frame("cam-a", frame_id, faint)
            (header,) = client.headers(1)
            return header.decision

        assert decide(1) == "NG"
        set_threshold(bundle_dir, 0.3, set_by="test")
        assert decide(2) == "NG"  # bundle.json changed, but not reloaded yet
        reply = send_control(control, "reload")
        assert reply["ok"] and reply["model"]["threshold"] == 0.3
        assert decide(3) == "OK"

        reply = send_control(control, "threshold", value=0.15)
        assert reply == {"ok": True, "threshold": 0.15, "previous": 0.3, "range": [0.0, 0.5]}
        assert send_control(control, "threshold") == {
            "ok": True, "threshold": 0.15, "override": True, "range": [0.0, 0.5]
        }
        assert decide(4) == "NG"
        status = send_control(control, "status")
        assert status["ok"] and status["model"]["threshold_override"] is True
        assert send_control(control, "no-such-command")["ok"] is False
        assert send_control(control, "threshold", value="high")["ok"] is False


@pytest.mark.timeout(90)
def test_hot_reload_under_load_loses_no_frame_and_refuses_broken_bundles(
    tmp_path: Path, bundle_dir: Path, contract_onnx: Path, nan_onnx: Path
) -> None:
    v2 = make_bundle(tmp_path / "bundle-v2", contract_onnx, model_version="2")
    nan_bundle = make_bundle(tmp_path / "bundle-nan", nan_onnx, model_version="nan")
    corrupt = make_bundle(tmp_path / "bundle-corrupt", contract_onnx, model_version="corrupt")
    (corrupt / "model.onnx").write_bytes(b"edited on the line PC")  # checksum no longer matches
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not onnx")
    unloadable = make_bundle(tmp_path / "bundle-unloadable", garbage)  # checksum matches the garbage

    total, cameras = 400, ("cam-a", "cam-b")
    options = {"queue_size": total, "max_batch": 4, "reload_allow": (tmp_path,)}
    with running_daemon(bundle_dir, **options) as daemon, Client.of(daemon) as client:
        control = daemon.endpoints["control"]

        def produce() -> None:
            for frame_id in range(total):
                box = (8, 8, 24, 24) if frame_id % 3 == 0 else None
                rgb = square_frame(64, 64, box) if box else flat_frame(64, 64)
                client.send(frame_parts(cameras[frame_id % 2], frame_id, rgb))
                time.sleep(0.001)

        producer = threading.Thread(target=produce)
        producer.start()
        received = []
        received += client.headers(60)
        outcomes = [
            send_control(control, "reload", path=str(nan_bundle))["ok"],
            send_control(control, "reload", path=str(corrupt))["ok"],
            send_control(control, "reload", path=str(unloadable))["ok"],
            send_control(control, "reload", path=str(tmp_path / "missing"))["ok"],
            send_control(control, "reload", path=str(v2))["ok"],
        ]
        producer.join(timeout=30)
        received += client.headers(total - len(received), timeout_s=30)

    assert outcomes == [False, False, False, False, True]
    assert sorted(h.frame_id for h in received) == list(range(total))  # each frame exactly once
    assert all(h.ok for h in received)
    for header in received:
        assert header.decision == ("NG" if header.frame_id % 3 == 0 else "OK")
    for camera in cameras:
        versions = [h.model_version for h in received if h.camera_id == camera]
        assert versions[0] == "1" and versions[-1] == "2"
        assert versions == sorted(versions)  # in order: never back to the old model
    assert daemon.metrics.reloads.value(outcome="refused") == 4
    assert daemon.metrics.reloads.value(outcome="ok") == 1


def test_sub_intake_connects_to_a_camera_publisher(bundle_dir: Path) -> None:
    import zmq

    context = zmq.Context()
    camera = context.socket(zmq.PUB)
    camera.linger = 0
    port = camera.bind_to_random_port("tcp://127.0.0.1")
    try:
        intake = f"tcp://127.0.0.1:{port}"
        with running_daemon(bundle_dir, intake=intake, intake_mode="sub", intake_connect=True) as daemon:
            client = Client("tcp://127.0.0.1:1", daemon.endpoints["results"])  # only its SUB is used
            try:
                # PUB drops frames until the daemon's subscription arrives: repeat until answered.
                deadline = time.monotonic() + 10
                found = []
                while not found and time.monotonic() < deadline:
                    camera.send_multipart(frame_parts("cam-s", 1, square_frame(40, 40, (5, 5, 20, 20))))
                    found = client.quiet(0.1)
                assert found and found[0].camera_id == "cam-s" and found[0].decision == "NG"
            finally:
                client.close()
    finally:
        camera.close()
        context.term()


def test_missing_or_broken_bundle_refuses_to_start(tmp_path: Path, nan_onnx: Path) -> None:
    from runtime_harness import daemon_options

    from llb_edge.bundle import BundleError
    from llb_edge.runtime.daemon import Daemon

    with pytest.raises(BundleError):
        Daemon(tmp_path / "nothing", daemon_options()).start()
    with pytest.raises(RuntimeError, match="non-finite"):
        Daemon(make_bundle(tmp_path / "nan", nan_onnx), daemon_options()).start()


def test_default_endpoints_are_loopback() -> None:
    from llb_edge.runtime.daemon import ServeOptions

    options = ServeOptions()
    for endpoint in (options.intake, options.results, options.control):
        assert endpoint is not None and endpoint.startswith("tcp://127.0.0.1:")
    assert options.health_host == "127.0.0.1"


def test_results_keep_inspection_order_with_several_post_workers(bundle_dir: Path) -> None:
    # Large frames with a defect (slow region search) between small flat ones (fast): workers
    # finish out of order, the publisher must not.
    total, cameras = 60, ("cam-a", "cam-b")
    with running_daemon(bundle_dir, post_workers=4, queue_size=total, max_batch=8, max_wait_ms=5) as daemon, \
            Client.of(daemon) as client:
        for frame_id in range(total):
            heavy = frame_id % 4 == 0
            rgb = square_frame(768, 1024, (100, 100, 500, 400)) if heavy else flat_frame(32, 32)
            client.send_frame(cameras[frame_id % 2], frame_id, rgb)
        headers = client.headers(total, timeout_s=40)
    assert all(h.ok for h in headers)
    for camera in cameras:
        ids = [h.frame_id for h in headers if h.camera_id == camera]
        assert ids == sorted(ids) and len(ids) == total // 2
    assert [h.decision for h in sorted(headers, key=lambda h: h.frame_id)] == [
        "NG" if frame_id % 4 == 0 else "OK" for frame_id in range(total)
    ]
    assert daemon.metrics.frames.total() == total


def test_a_post_processing_failure_is_answered_in_order(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llb_edge.runtime.daemon as daemon_module

    real = daemon_module.inspection_result

    def failing_on_frame_3(**kwargs: object) -> object:
        if kwargs["frame_id"] == 3:
            raise ValueError("injected post-processing fault")
        return real(**kwargs)

    monkeypatch.setattr(daemon_module, "inspection_result", failing_on_frame_3)
    with running_daemon(bundle_dir, post_workers=3) as daemon, Client.of(daemon) as client:
        for frame_id in range(6):
            client.send_frame("cam-a", frame_id, flat_frame(64, 64))
        headers = client.headers(6)
        assert [h.frame_id for h in headers] == list(range(6))
        assert [h.ok for h in headers] == [True, True, True, False, True, True]
        assert headers[3].error.code is ErrorCode.INTERNAL and "injected" in headers[3].error.message
        assert daemon.metrics.errors.value(code="INTERNAL") == 1
        assert daemon.is_live()
