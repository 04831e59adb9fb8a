"""The whole frame is inspected, or exactly the region of interest the user chose; regions follow the
threshold in use; the NG-rate drift check. Real daemon, real ZeroMQ, real ONNX Runtime (contract model)."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from runtime_harness import (
    CROP,
    MAP_SIZE,
    Client,
    assert_box_close,
    flat_frame,
    make_bundle,
    running_daemon,
    square_frame,
)

from llb_edge.bundle import Threshold, load_bundle, utc_now, write_manifest
from llb_edge.data.transforms import Geometry
from llb_edge.protocol import ErrorCode
from llb_edge.runtime.control import send_control
from llb_edge.runtime.health import parse_prometheus_text
from llb_edge.runtime.postprocess import ModelIdentity, inspection_result
from llb_edge.runtime.roi import RegionOfInterest, RegionOfInterestError, parse_regions, region_of_interest

pytest_plugins = ["runtime_fixtures"]
pytestmark = pytest.mark.timeout(60)

HEIGHT, WIDTH, SIDE = 240, 300, 36
BANDS = {
    "top": (132, 0), "bottom": (132, HEIGHT - SIDE), "left": (0, 102), "right": (WIDTH - SIDE, 102),
    "top-left": (0, 0), "top-right": (WIDTH - SIDE, 0), "bottom-left": (0, HEIGHT - SIDE),
    "bottom-right": (WIDTH - SIDE, HEIGHT - SIDE),
}


def _cell(height: int, width: int) -> float:
    """One map cell in original pixels when the whole (inspected) frame is resized to the model input."""
    return max(height, width) / CROP * (CROP / MAP_SIZE)


@pytest.fixture
def whole_frame_bundle(tmp_path: Path, contract_onnx: Path) -> Path:
    return make_bundle(tmp_path / "whole", contract_onnx, resize=CROP)


def test_a_defect_in_any_border_band_is_ng_with_its_box(whole_frame_bundle: Path) -> None:
    with running_daemon(whole_frame_bundle, map_payload="float16") as daemon, Client.of(daemon) as client:
        for index, (x, y) in enumerate(BANDS.values()):
            client.send_frame("cam", index, square_frame(HEIGHT, WIDTH, (x, y, SIDE, SIDE)))
        results = {header.frame_id: (header, anomaly_map) for header, anomaly_map in client.results(len(BANDS))}
    for index, (band, (x, y)) in enumerate(BANDS.items()):
        header, anomaly_map = results[index]
        assert header.decision == "NG", band
        assert header.region is not None, band
        assert_box_close(header.region.bbox, (x, y, SIDE, SIDE), tolerance=_cell(HEIGHT, WIDTH) + 2)
        assert header.map is not None and header.map.crop_box == (0.0, 0.0, float(WIDTH), float(HEIGHT))


def test_the_paper_crop_misses_a_crack_in_the_border_ring(bundle_dir: Path, whole_frame_bundle: Path) -> None:
    crack = square_frame(HEIGHT, WIDTH, (0, 60, 12, 120))  # 12 px along the left edge
    for bundle, expected in ((bundle_dir, "OK"), (whole_frame_bundle, "NG")):
        with running_daemon(bundle) as daemon, Client.of(daemon) as client:
            client.send_frame("cam", 1, crack)
            (header,) = client.headers(1)
        assert header.decision == expected, bundle


def test_only_the_region_of_interest_is_inspected(whole_frame_bundle: Path) -> None:
    right_half = RegionOfInterest(x=150, y=0, width=150, height=HEIGHT)
    with running_daemon(whole_frame_bundle, map_payload="uint8", regions={"cam": right_half}) as daemon, \
            Client.of(daemon) as client:
        for index, band in enumerate(("left", "top-left", "right", "top-right")):
            x, y = BANDS[band]
            client.send_frame("cam", index, square_frame(HEIGHT, WIDTH, (x, y, SIDE, SIDE)))
        client.send_frame("other", 9, square_frame(HEIGHT, WIDTH, (0, 0, SIDE, SIDE)))  # no ROI: whole frame
        client.send_frame("cam", 10, flat_frame(100, 100))  # too small for the region
        results = {header.frame_id: (header, anomaly_map) for header, anomaly_map in client.results(6)}
    for index in (0, 1):  # outside the region: not inspected
        header = results[index][0]
        assert header.decision == "OK" and header.region is None and header.score < 0.02
    for index, band in ((2, "right"), (3, "top-right")):
        header = results[index][0]
        assert header.decision == "NG" and header.region is not None
        assert_box_close(header.region.bbox, (*BANDS[band], SIDE, SIDE), tolerance=_cell(HEIGHT, 150) + 2)
        assert header.map is not None and header.map.crop_box == (150.0, 0.0, 300.0, float(HEIGHT))
        assert header.image_size == (HEIGHT, WIDTH)
    assert results[9][0].decision == "NG"
    error = results[10][0].error
    assert error is not None and error.code is ErrorCode.BAD_SHAPE and "does not fit" in error.message


def test_a_mask_excludes_its_zero_pixels(whole_frame_bundle: Path, tmp_path: Path) -> None:
    mask = np.full((HEIGHT, WIDTH), 255, np.uint8)
    mask[:60, 225:] = 0  # the top-right corner is not inspected
    mask_path = tmp_path / "mask.png"
    cv2.imwrite(str(mask_path), mask)
    regions = parse_regions([], [f"cam={mask_path}"])
    assert (regions["cam"].x, regions["cam"].y, regions["cam"].width, regions["cam"].height) == (0, 0, WIDTH, HEIGHT)
    with running_daemon(whole_frame_bundle, regions=regions) as daemon, Client.of(daemon) as client:
        for index, band in enumerate(("top-right", "bottom-right", "top-left")):
            x, y = BANDS[band]
            client.send_frame("cam", index, square_frame(HEIGHT, WIDTH, (x, y, SIDE, SIDE)))
        client.send_frame("cam", 3, square_frame(HEIGHT + 10, WIDTH, (0, 0, SIDE, SIDE)))  # not the mask's size
        results = {header.frame_id: header for header in client.headers(4)}
    assert results[0].decision == "OK" and results[0].region is None
    for index, band in ((1, "bottom-right"), (2, "top-left")):
        assert results[index].decision == "NG" and results[index].region is not None
        assert_box_close(results[index].region.bbox, (*BANDS[band], SIDE, SIDE), tolerance=_cell(HEIGHT, WIDTH) + 2)
    assert results[3].error is not None and results[3].error.code is ErrorCode.BAD_SHAPE


def test_region_settings_are_checked() -> None:
    assert parse_regions(["cam1=10,20,30,40"], []) == {"cam1": RegionOfInterest(10, 20, 30, 40)}
    for boxes, message in ((["cam1=10,20,30"], "x,y,width,height"), (["cam1"], "CAMERA=VALUE"),
                           (["cam1=0,0,0,5"], "positive size"), (["c=1,1,2,2", "c=1,1,2,2"], "two regions")):
        with pytest.raises(RegionOfInterestError, match=message):
            parse_regions(boxes, [])
    with pytest.raises(RegionOfInterestError, match="outside"):
        region_of_interest((0, 0, 50, 50), np.ones((40, 40), bool))
    assert RegionOfInterest(10, 20, 30, 40).misfit(60, 40) is None
    assert "does not fit" in str(RegionOfInterest(10, 20, 30, 40).misfit(59, 40))


def test_an_ok_result_never_carries_a_box_and_the_box_follows_the_threshold() -> None:
    anomaly_map = np.full((1, MAP_SIZE, MAP_SIZE), 0.002, np.float32)
    anomaly_map[0, 4:6, 4:8] = 0.2
    anomaly_map[0, 5, 5] = 0.5  # one hot cell: the map's max is far above the top-cells mean
    geometry = Geometry(CROP, CROP)

    def result(threshold: float, score: float = 0.35) -> tuple:
        header, _ = inspection_result(
            camera_id="cam", frame_id=1, capture_ts=None, anomaly_map=anomaly_map, score=score, score_max=0.5,
            threshold=threshold, geometry=geometry, height=160, width=160,
            identity=ModelIdentity("m", "1", "ort-cpu"), map_encoding=None)
        return header.decision, header.region

    decision, region = result(0.4)  # max 0.5 >= threshold, but the score is below it
    assert decision == "OK" and region is None
    decision, low = result(0.1)
    decision_high, high = result(0.3, score=0.5)
    assert decision == decision_high == "NG" and low is not None and high is not None
    assert high.area_px < low.area_px  # a higher threshold leaves only the hot cell's surroundings


def test_a_runtime_override_moves_the_region_threshold_too(bundle_dir: Path) -> None:
    faint = flat_frame(64, 64)
    faint[:16, :16] = 180  # map 0.206 under the square: NG at the bundle's 0.1
    with running_daemon(bundle_dir) as daemon, Client.of(daemon) as client:
        client.send_frame("cam", 1, faint)
        (first,) = client.headers(1)
        assert send_control(daemon.endpoints["control"], "threshold", value=0.3)["ok"]
        client.send_frame("cam", 2, faint)
        (second,) = client.headers(1)
    assert first.decision == "NG" and first.region is not None
    assert second.decision == "OK" and second.region is None


def _with_calibration(bundle: Path, scores: list[float]) -> None:
    loaded = load_bundle(bundle)
    manifest = loaded.manifest
    manifest.extra["calibration"] = {"scores": scores, "count": len(scores)}
    manifest.threshold = Threshold(value=0.1, method="tests", set_by="tests", set_at=utc_now())
    write_manifest(bundle, manifest)


def test_ng_rate_drift_is_exported_and_warned(bundle_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    # 99 calibration scores 0.001..0.099: at threshold 0.1 none rejects, expected rate 1/100.
    _with_calibration(bundle_dir, [i / 1000 for i in range(1, 100)])
    options = {"ng_rate_window": 20, "ng_rate_alpha": 0.01, "queue_size": 32}
    with caplog.at_level(logging.INFO), running_daemon(bundle_dir, **options) as daemon, Client.of(daemon) as client:
        defect = square_frame(64, 64, (8, 8, 16, 16))
        for index in range(20):
            client.send_frame("cam", index, defect if index % 4 == 0 else flat_frame(64, 64))
        client.headers(20)
        samples = parse_prometheus_text(daemon.metrics.registry.render())
        assert samples["llb_ng_rate_expected"] == pytest.approx(0.01)
        assert samples["llb_ng_rate_alarm_count"] == 3  # P(X >= 3) < 0.01 < P(X >= 2) for Binomial(20, 0.01)
        assert samples['llb_ng_rate{camera="cam"}'] == pytest.approx(0.25)
        assert samples['llb_ng_rate_alarm{camera="cam"}'] == 1
        assert daemon.status()["model"]["expected_ng_rate"] == pytest.approx(0.01)
        # An override changes the expected rate (50 of 99 calibration scores are >= 0.05) and restarts the windows.
        assert send_control(daemon.endpoints["control"], "threshold", value=0.05)["ok"]
        assert daemon.status()["model"]["expected_ng_rate"] == pytest.approx(51 / 100)
        samples = parse_prometheus_text(daemon.metrics.registry.render())
        assert 'llb_ng_rate{camera="cam"}' not in samples
    warnings = [r for r in caplog.records if r.getMessage() == "ng_rate_high"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
