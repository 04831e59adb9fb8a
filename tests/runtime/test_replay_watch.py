"""replay (camera simulator) -> daemon -> watch, over real sockets."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from runtime_harness import flat_frame, running_daemon, square_frame

from llb_edge.protocol import ResultHeader
from llb_edge.runtime.replay import replay, source_frames
from llb_edge.runtime.watch import watch

pytest_plugins = ["runtime_fixtures"]  # contract-test-model bundles
pytestmark = pytest.mark.timeout(60)


def _write_folder(folder: Path) -> list[str]:
    """Three PNGs; the expected decision of each, in name order."""
    folder.mkdir()
    frames = {"a.png": flat_frame(60, 80), "b.png": square_frame(60, 80, (20, 10, 30, 30)), "c.png": flat_frame(70, 70)}
    for name, rgb in frames.items():
        cv2.imwrite(str(folder / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (folder / "notes.txt").write_text("not an image")
    return ["OK", "NG", "OK"]


def _write_video(path: Path, count: int) -> list[str]:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    expected = []
    for index in range(count):
        defect = index % 2 == 1
        rgb = square_frame(48, 64, (16, 8, 24, 24)) if defect else flat_frame(48, 64)
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        expected.append("NG" if defect else "OK")
    writer.release()
    return expected


def _watch_in_background(endpoint: str, count: int, out: io.StringIO) -> tuple[threading.Thread, list, threading.Event]:
    connected = threading.Event()
    found: list[list[ResultHeader]] = []
    thread = threading.Thread(
        target=lambda: found.append(watch(endpoint, count=count, timeout_s=20, out=out, connected=connected))
    )
    thread.start()
    assert connected.wait(10), "watch saw no heartbeat"
    return thread, found, connected


def test_replay_folder_and_video_to_watch(tmp_path: Path, bundle_dir: Path) -> None:
    folder_expected = _write_folder(tmp_path / "images")
    video_expected = _write_video(tmp_path / "line.avi", 4)
    assert len(list(source_frames(tmp_path / "line.avi"))) == 4

    with running_daemon(bundle_dir) as daemon:
        out = io.StringIO()
        total = 2 * len(folder_expected) + len(video_expected)
        thread, found, _ = _watch_in_background(daemon.endpoints["results"], total, out)
        # The folder twice round (loop) as raw frames, then the video as JPEG from another camera.
        stats = replay(tmp_path / "images", daemon.endpoints["intake"], fps=200, camera_id="cam-f", loop=True, count=6)
        assert (stats.sent, stats.not_sent) == (6, 0)
        stats = replay(
            tmp_path / "line.avi",
            daemon.endpoints["intake"],
            fps=0,
            camera_id="cam-v",
            encoding="jpeg",
            first_frame_id=100,
        )
        assert stats.sent == 4
        thread.join(timeout=30)

    (results,) = found
    assert len(results) == total
    by_camera = {
        camera: [r.decision for r in sorted((r for r in results if r.camera_id == camera), key=lambda r: r.frame_id)]
        for camera in ("cam-f", "cam-v")
    }
    assert by_camera == {"cam-f": folder_expected * 2, "cam-v": video_expected}
    assert [r.frame_id for r in results if r.camera_id == "cam-v"] == [100, 101, 102, 103]
    lines = out.getvalue().splitlines()
    assert len(lines) == total
    assert any(line.startswith("cam-f #1 NG score=0.5") and "bbox=(" in line for line in lines)


def test_watch_filters_cameras_exactly_and_times_out(bundle_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    cv2.imwrite(str(folder / "x.png"), np.full((32, 32, 3), 128, np.uint8))
    with running_daemon(bundle_dir) as daemon:
        out = io.StringIO()
        connected = threading.Event()
        found: list[list[ResultHeader]] = []
        thread = threading.Thread(
            target=lambda: found.append(
                watch(
                    daemon.endpoints["results"],
                    cameras=["cam1"],
                    timeout_s=1.5,
                    heartbeats=True,
                    out=out,
                    connected=connected,
                )
            )
        )
        thread.start()
        assert connected.wait(10)
        replay(folder, daemon.endpoints["intake"], camera_id="cam10", fps=0)  # prefix of no interest
        replay(folder, daemon.endpoints["intake"], camera_id="cam1", fps=0)
        thread.join(timeout=10)
    assert [r.camera_id for r in found[0]] == ["cam1"]
    assert "heartbeat #" in out.getvalue()


def test_replay_refuses_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(source_frames(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        list(source_frames(tmp_path / "empty"))
    with pytest.raises(ValueError):
        replay(tmp_path, "tcp://127.0.0.1:1", encoding="bmp")
