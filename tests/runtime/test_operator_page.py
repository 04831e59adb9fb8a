"""The operator page over real HTTP from an in-process daemon: state, images, bounds, hostile requests.

The browser test (a real Chromium drawing the page) is tests/runtime/test_operator_page_browser.py.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from runtime_harness import (
    Client,
    assert_box_close,
    cell_size_px,
    flat_frame,
    running_daemon,
    square_frame,
)

from llb_edge.bundle import load_bundle
from llb_edge.data.transforms import Geometry
from llb_edge.protocol import ResultHeader
from llb_edge.runtime.operator_page import (
    GALLERY_MAX_SIDE,
    PAGE_NG_FRAMES,
    PAGE_SHOWN_FRAMES,
    THUMB_MAX_SIDE,
    OperatorPage,
    RateSeries,
    expected_rates,
)

pytest_plugins = ["runtime_fixtures"]  # contract-test-model bundles
pytestmark = pytest.mark.timeout(120)  # the first test may pay the session's model export

BOX = (40, 30, 24, 20)  # x, y, w, h of the white square (the known defect) in a 120 x 160 frame


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def page_state(base: str) -> dict[str, Any]:
    status, headers, body = fetch(base + "/page/state.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    return json.loads(body)


def decode_jpeg(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a JPEG"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def test_page_serves_latest_frame_ng_gallery_rates_and_counters(bundle_dir: Path) -> None:
    frames = 2 * PAGE_NG_FRAMES + 4  # more NG frames than the gallery holds
    # A queue for all of them: none is dropped (keep-newest) however slowly the shared CPU runs.
    with running_daemon(bundle_dir, health_port=0, queue_size=frames) as daemon, Client.of(daemon) as client:
        for frame_id in range(frames):  # odd ids carry the defect
            image = square_frame(120, 160, BOX) if frame_id % 2 else flat_frame(120, 160)
            client.send_frame("cam-a", frame_id, image)
        client.send_frame("cam-b", "big-1", flat_frame(900, 1200))
        client.headers(frames + 1)
        base = daemon.health_url
        assert base is not None
        state = page_state(base)

        status, headers, html = fetch(base + "/")
        assert status == 200 and b"/page/operator.js" in html
        assert "script-src 'self'" in headers["Content-Security-Policy"]  # no inline script, no other origin
        for asset in ("/page/operator.js", "/page/operator.css"):
            assert fetch(base + asset)[0] == 200

        assert state["ready"] is True and state["model"]["model_id"] == "contract-test-model"
        assert state["model"]["backend"] == "ort-cpu" and state["model"]["threshold"] == pytest.approx(0.1)
        assert state["totals"] == {
            "frames": frames + 1,
            "errors": 0,
            "drops": 0,
            "queue_depth": 0,
            "queue_capacity": daemon.options.queue_size,
        }
        assert state["expected"] == {"expected_frr": None, "threshold_method": "tests", "score_stats": {}}
        cameras = {camera["camera_id"]: camera for camera in state["cameras"]}
        cam_a = cameras["cam-a"]
        assert (cam_a["frames"], cam_a["ng"]) == (frames, frames // 2)
        # Post workers finish out of order; the live view still shows the newest frame received.
        assert cam_a["latest"]["frame_id"] == frames - 1 and cam_a["latest"]["decision"] == "NG"
        gallery = cam_a["gallery"]
        assert len(gallery) == PAGE_NG_FRAMES  # the fixed ring
        assert {item["frame_id"] for item in gallery} == set(range(frames - 2 * PAGE_NG_FRAMES + 1, frames, 2))
        ng = gallery[0]
        assert ng["decision"] == "NG" and ng["score"] >= ng["threshold"] and ng["latency_ms"] > 0
        assert_box_close(tuple(ng["region"]["bbox"]), BOX, cell_size_px(120, 160))
        assert cameras["cam-b"]["gallery"] == [] and cameras["cam-b"]["latest"]["decision"] == "OK"

        # The thumbnail: the map's heat over the square, the frame untouched away from it.
        status, headers, data = fetch(f"{base}/page/image/{ng['seq']}.jpg?view=thumb")
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        thumb = decode_jpeg(data)
        assert thumb.shape == (120, 160, 3)
        x, y, w, h = BOX
        inside = thumb[y + h // 2, x + w // 2].astype(int)
        assert inside[0] > 150 and inside[0] - inside[2] > 60  # white turned red-hot
        assert np.abs(thumb[100, 140].astype(int) - 128).max() <= 6  # grey background stays grey
        # The full-size frame without the map: the square is still white; the box is drawn around it.
        plain = decode_jpeg(fetch(f"{base}/page/image/{ng['seq']}.jpg?view=image")[2])
        assert plain.shape == (120, 160, 3) and plain[y + h // 2, x + w // 2].min() > 230
        overlay = decode_jpeg(fetch(f"{base}/page/image/{ng['seq']}.jpg?view=overlay")[2])
        assert overlay.shape == (120, 160, 3)
        assert decode_jpeg(fetch(f"{base}/page/image/{ng['seq']}.jpg?view=mini")[2]).shape == (120, 160, 3)
        # A large frame is downscaled for the live view (the page never ships megapixels per refresh).
        big = decode_jpeg(fetch(f"{base}/page/image/{cameras['cam-b']['latest']['seq']}.jpg")[2])
        assert big.shape == (THUMB_MAX_SIDE * 900 // 1200, THUMB_MAX_SIDE, 3)
        mini = decode_jpeg(fetch(f"{base}/page/image/{cameras['cam-b']['latest']['seq']}.jpg?view=mini")[2])
        assert mini.shape == (GALLERY_MAX_SIDE * 900 // 1200, GALLERY_MAX_SIDE, 3)

        # The rates: the newest whole-second bins hold the frames once their second is over.
        time.sleep(1.1)
        series = page_state(base)["series"]
        assert series["frames"] == frames + 1 and series["ng"] == frames // 2
        assert max(series["frames_per_s"]) > 0
        assert any(rate is not None and 0 < rate < 1 for rate in series["ng_rate"])


def test_page_is_read_only_and_refuses_hostile_requests(bundle_dir: Path) -> None:
    with running_daemon(bundle_dir, health_port=0) as daemon, Client.of(daemon) as client:
        client.send_frame("cam-a", 1, square_frame(120, 160, BOX))
        client.headers(1)
        base = daemon.health_url
        assert base is not None
        seq = page_state(base)["cameras"][0]["latest"]["seq"]
        before = daemon.status()

        for method in ("POST", "PUT", "DELETE", "PATCH"):
            for path in ("/", "/page/state.json", f"/page/image/{seq}.jpg"):
                assert fetch(base + path, method)[0] == 501, (method, path)
        bad = [
            "/page/image/-1.jpg",
            "/page/image/1e3.jpg",
            "/page/image/%2e%2e%2fetc.jpg",
            "/page/image/../../etc/passwd",
            f"/page/image/{seq}.png",
            f"/page/image/{seq}",
            "/page/image/" + "9" * 40 + ".jpg",
            "/page/image/\u0661.jpg",  # a non-ASCII digit
            f"/page/image/{seq}.jpg?view=../../x",
            f"/page/image/{seq}.jpg?view=thumb&view=%00",
        ]
        for path in bad:
            status, _, _ = fetch(base + urllib.request.quote(path, safe="/?=&%"))
            assert status == 400, path
        assert fetch(base + "/page/image/123456.jpg")[0] == 404  # never held
        assert fetch(base + "/page/../runtime/daemon.py")[0] == 404
        assert fetch(base + "/page/operator.py")[0] == 404

        # Raw request lines an HTTP client library would refuse to send.
        host, port = base.removeprefix("http://").split(":")
        for target in (b"/page/state.json\x7f?<script>", b"/page/image/1.jpg\x00", b"*"):
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                raw.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                status_line = raw.recv(1024).split(b"\r\n", 1)[0]
            assert status_line.split(b" ")[1] in (b"400", b"404"), (target, status_line)

        after = daemon.status()
        assert after["model"] == before["model"] and after["state"] == "serving"
        assert fetch(base + "/live")[0] == 200 and fetch(base + "/metrics")[0] == 200


def _result(camera_id: str, frame_id: int, decision: str) -> ResultHeader:
    return ResultHeader(camera_id=camera_id, frame_id=frame_id, decision=decision, score=0.5, threshold=0.1)


def test_memory_is_a_fixed_ring_per_camera_and_images_are_encoded_once(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    page = OperatorPage(lambda: {}, lambda: bundle)
    geometry = Geometry(resize=72, crop=64)
    image = flat_frame(48, 64)
    anomaly_map = np.zeros((1, 16, 16), np.float32)
    for frame_id in range(200):
        page.record(_result("cam-a", frame_id, "NG" if frame_id % 3 else "OK"), image, anomaly_map, geometry, 0.1,
                    float(frame_id))
        if frame_id % 10 == 0:
            page.state()  # each state read pins the latest frame for the browser's next image request
    held = {id(frame) for frame in page._cameras["cam-a"].held()}
    assert len(held) <= 1 + PAGE_NG_FRAMES + PAGE_SHOWN_FRAMES
    seq = page.state()["cameras"][0]["latest"]["seq"]
    first = page.image(seq, "thumb")
    assert first is not None and page.image(seq, "thumb") is first  # cached: one encode per frame and view
    assert page.image(1, "thumb") is None  # long gone from the rings


def test_expected_false_reject_rate_is_read_defensively(bundle_dir: Path) -> None:
    plain = load_bundle(bundle_dir)
    assert expected_rates(plain)["expected_frr"] is None and expected_rates(None)["expected_frr"] is None
    # threshold.frr.expected in bundle.json: the rate the calibration slice predicts at the threshold.
    plain.manifest.threshold.frr = {"target": 0.01, "calibration_count": 120, "expected": 0.002}
    assert expected_rates(plain)["expected_frr"] == pytest.approx(0.002)
    for junk in ("0.1", float("nan"), True, [0.1], None):
        plain.manifest.threshold.frr = {"expected": junk}
        assert expected_rates(plain)["expected_frr"] is None


def test_rate_series_bins_only_whole_seconds_of_the_window() -> None:
    series = RateSeries(window_s=60)
    for second, ng in [(1000, False), (1000, True), (1005, True), (1059, False), (1060, True)]:
        series.add(ng, second + 0.5)
    bins = series.bins(now=1060.7, bin_s=10)
    assert bins["window_s"] == 60 and len(bins["frames_per_s"]) == 6
    assert bins["frames"] == 4 and bins["ng"] == 2  # second 1060 is still running: not shown yet
    assert bins["frames_per_s"][0] == pytest.approx(0.3) and bins["ng_rate"][0] == pytest.approx(2 / 3)
    assert bins["ng_rate"][1:5] == [None] * 4 and bins["ng_rate"][5] == 0.0


def test_no_page_without_the_health_server(bundle_dir: Path) -> None:
    with running_daemon(bundle_dir) as daemon:
        assert daemon.page is None and daemon.health_url is None
