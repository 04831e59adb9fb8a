"""CURVE: only clients whose public key is in the allowed folder get frames processed."""

from __future__ import annotations

import contextlib
import shutil
import stat
from pathlib import Path

import pytest
import zmq
from runtime_harness import Client, flat_frame, running_daemon, square_frame

from llb_edge.runtime.keys import generate_keypair

pytest_plugins = ["runtime_fixtures"]  # contract-test-model bundles
pytestmark = pytest.mark.timeout(60)


def test_keypair_files(tmp_path: Path) -> None:
    keys = generate_keypair(tmp_path / "keys", "camera1")
    assert keys.public.name == "camera1.key" and keys.secret.name == "camera1.key_secret"
    assert "secret-key" not in keys.public.read_text()
    assert stat.S_IMODE(keys.secret.stat().st_mode) == 0o600
    with pytest.raises(ValueError):
        generate_keypair(tmp_path, "../escape")


def _send_frames(client: Client, camera: str) -> None:
    for frame_id in range(5):
        # The handshake fails, so a send may time out once the socket's queue is full.
        with contextlib.suppress(zmq.Again):
            client.send_frame(camera, frame_id, flat_frame(32, 32))


def test_only_allowed_clients_are_processed(tmp_path: Path, bundle_dir: Path) -> None:
    keys = tmp_path / "keys"
    server = generate_keypair(keys, "server")
    allowed_client = generate_keypair(keys, "camera1")
    unknown_client = generate_keypair(keys, "intruder")
    allowed_dir = tmp_path / "allowed"
    allowed_dir.mkdir()
    shutil.copy(allowed_client.public, allowed_dir)

    curve = {"curve_secret": server.secret, "curve_allowed": allowed_dir, "control_allowed": allowed_dir}
    with running_daemon(bundle_dir, **curve) as daemon:
        # The allowed client (also allowed to subscribe) gets results.
        with Client.of(daemon, curve_secret=allowed_client.secret, server_public=server.public) as allowed:
            # Frames from an unknown key and from a plain-text client never get in.
            with Client.of(
                daemon, curve_secret=unknown_client.secret, server_public=server.public, subscribe=False
            ) as intruder:
                _send_frames(intruder, "cam-x")
                # An unauthenticated subscriber receives nothing either.
                assert intruder.quiet(0.3) == []
            with Client.of(daemon, subscribe=False) as plain:
                _send_frames(plain, "cam-y")
                assert plain.quiet(0.3) == []

            allowed.send_frame("cam-a", 1, square_frame(32, 32, (4, 4, 16, 16)))
            headers = allowed.headers(1)
            assert headers[0].camera_id == "cam-a" and headers[0].decision == "NG"
            assert allowed.quiet(0.2) == []  # and nothing from the intruders

        assert daemon.metrics.messages.total() == 1
        assert daemon.status()["queues"].keys() == {"cam-a"}
