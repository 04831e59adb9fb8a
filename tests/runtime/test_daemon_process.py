"""The daemon as a process: graceful SIGTERM, and serving on a machine without torch."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from runtime_harness import ANY_PORT, Client, daemon_process, flat_frame, square_frame

from llb_edge.bundle import set_threshold

pytest_plugins = ["runtime_fixtures"]  # contract-test-model bundles
pytestmark = pytest.mark.timeout(60)


def _daemon_args(bundle: Path, *extra: str) -> list[str]:
    return [
        str(bundle),
        *("--intake", ANY_PORT, "--results", ANY_PORT, "--control", "off", "--health-port", "off"),
        *("--heartbeat-s", "0.05", "--ort-threads", "1"),
        *extra,
    ]


def test_sigterm_finishes_in_flight_frames(bundle_dir: Path) -> None:
    # A batch waits up to 2 s to fill (max-batch above what is sent): the frames are still queued
    # when SIGTERM arrives, and must be inspected and published before the process exits.
    args = _daemon_args(bundle_dir, "--max-batch", "64", "--max-wait-ms", "2000", "--queue-size", "64")
    daemon = daemon_process(args)
    try:
        serving = daemon.wait_for("serving")
        with Client(serving["intake"], serving["results"]) as client:
            sent = 20
            for frame_id in range(sent):
                frame = square_frame(48, 48, (8, 8, 20, 20)) if frame_id % 2 else flat_frame(48, 48)
                client.send_frame("cam-a", frame_id, frame)
            time.sleep(0.3)  # the frames reach the daemon's queue; the batch is still waiting
            assert client.quiet(0.05) == []  # nothing answered yet: the batch is still filling
            daemon.process.send_signal(signal.SIGTERM)
            headers = client.headers(sent, timeout_s=20)
        assert daemon.process.wait(timeout=20) == 0
        assert sorted(h.frame_id for h in headers) == list(range(sent))
        assert all(h.decision == ("NG" if h.frame_id % 2 else "OK") for h in headers)
        stopped = daemon.wait_for("stopped")
        assert stopped["queued_at_stop"] == sent and stopped["frames"] == sent
    finally:
        daemon.stop()


def test_serves_without_torch_and_reloads_on_sighup(bundle_dir: Path) -> None:
    daemon = daemon_process(_daemon_args(bundle_dir), block_torch=True)
    try:
        serving = daemon.wait_for("serving")
        assert serving["backend"] == "ort-cpu"
        with Client(serving["intake"], serving["results"]) as client:
            client.send_frame("cam-a", 1, flat_frame(40, 50))
            client.send_frame("cam-a", 2, square_frame(40, 50, (10, 10, 20, 20)), "jpeg")
            client.send_frame("cam-a", 3, flat_frame(40, 50), "png")
            decisions = {h.frame_id: h.decision for h in client.headers(3)}
        assert decisions == {1: "OK", 2: "NG", 3: "OK"}

        # SIGHUP re-reads bundle.json: an operator raised the threshold above a faint mark's 0.21.
        set_threshold(bundle_dir, 0.3, set_by="test")
        daemon.process.send_signal(signal.SIGHUP)
        assert daemon.wait_for("reloaded")["threshold"] == 0.3
        faint = flat_frame(40, 50)
        faint[10:30, 10:30] = 180  # |180/255 - 0.5| = 0.206: NG at the bundle's 0.1, OK at 0.3
        with Client(serving["intake"], serving["results"]) as client:
            client.send_frame("cam-a", 4, faint)
            (header,) = client.headers(1)
        assert header.decision == "OK" and header.threshold == 0.3
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=20) == 0
    finally:
        daemon.stop()


def test_settings_file_then_flags_and_the_resolved_settings_logged_first(bundle_dir: Path, tmp_path: Path) -> None:
    settings = tmp_path / "serve.toml"
    settings.write_text(f'intake = "{ANY_PORT}"\nresults = "{ANY_PORT}"\ncontrol = "off"\nhealth_port = "off"\n'
                        'max_batch = 3\nheartbeat_s = 0.05\nort_threads = 1\n[capture]\nband = 0.25\n')
    daemon = daemon_process([str(bundle_dir), "--config", str(settings), "--max-batch", "5"])
    try:
        logged = daemon.wait_for("serve_settings")
        assert logged["settings_file"] == str(settings)
        resolved = logged["settings"]
        assert resolved["max_batch"] == 5  # the flag overrides the file
        assert (resolved["heartbeat_s"], resolved["capture"]["band"], resolved["control"]) == (0.05, 0.25, None)
        assert resolved["queue_size"] == 8  # neither: ServeOptions' default
        assert daemon.wait_for("serving")["backend"] == "ort-cpu"
    finally:
        daemon.stop()
