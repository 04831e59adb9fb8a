"""The S7 adapter against python-snap7's own in-process S7 server (skipped without python-snap7)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from runtime_harness import Client, flat_frame, running_daemon, square_frame, wait_until
from test_gateway_e2e import free_port

from llb_edge.runtime.gateway import GatewayThread
from llb_edge.runtime.gateway.config import CameraConfig, GatewayConfig, ReconnectPolicy, S7Config

snap7 = pytest.importorskip("snap7")
from llb_edge.runtime.gateway.s7 import decode_s7_block  # noqa: E402 - needs snap7
from llb_edge.runtime.gateway.tags import S7_HANDSHAKE_BYTE  # noqa: E402

pytest_plugins = ["runtime_fixtures"]
pytestmark = pytest.mark.timeout(60)

DB = 7
OFFSETS = {"cam1": 0, "cam2": 64}


def start_plc(port: int, memory: bytearray) -> object:
    server = snap7.Server(log=False)
    server.register_area(snap7.SrvArea.DB, DB, memory)
    server.start_to("127.0.0.1", port)
    return server


def test_s7_adapter_writes_the_data_block_handshakes_and_reconnects(bundle_dir: Path) -> None:
    port = free_port()
    memory = bytearray(128)
    plc = start_plc(port, memory)

    def block(camera: str) -> dict:
        start = OFFSETS[camera]
        return decode_s7_block(bytes(memory[start : start + 52]))

    try:
        with running_daemon(bundle_dir) as daemon, Client.of(daemon) as camera:
            config = GatewayConfig(
                cameras=(CameraConfig("cam1"), CameraConfig("cam2", handshake=True)),
                adapters=(S7Config(name="s7", cameras=("cam1", "cam2"), port=port, db=DB, offset=OFFSETS),),
                results=daemon.endpoints["results"],
                heartbeat_s=0.25,
                reconnect=ReconnectPolicy(initial_s=0.1, max_s=0.4),
            )
            with GatewayThread(config) as thread:
                runner = thread.gateway.runners[0]
                wait_until(lambda: runner.connected and thread.gateway.core.daemon_seen, 20, "S7 connected")
                camera.send_frame("cam1", 5, square_frame(64, 64, (8, 8, 24, 24)))
                [result] = camera.headers(1)
                wait_until(lambda: block("cam1")["InspectionID"] == 1, 10, "frame 5 (the first result) in the DB")
                values = block("cam1")
                assert values["NG"] and not values["OK"] and values["Ready"] and values["ResultValid"]
                assert values["Score"] == pytest.approx(result.score, rel=1e-6)
                assert values["BBox"] == list(result.region.bbox) and values["DefectArea"] == result.region.area_px
                assert values["ModelVersion"] == result.model_version

                # Handshake on cam2: the PLC writes Trigger into its own DB, then ResultsAck.
                trigger_at = OFFSETS["cam2"] + S7_HANDSHAKE_BYTE
                memory[trigger_at : trigger_at + 4] = struct.pack(">I", 31)
                wait_until(lambda: block("cam2")["Busy"], 10, "Busy after the trigger")
                camera.send_frame("cam2", 1, flat_frame(48, 48))
                wait_until(lambda: block("cam2")["ResultValid"], 10, "the triggered result")
                assert block("cam2")["InspectionID"] == 31 and block("cam2")["OK"]
                memory[trigger_at + 4 : trigger_at + 8] = struct.pack(">I", 31)
                wait_until(lambda: not block("cam2")["ResultValid"], 10, "ack clears ResultValid")

                # The CPU restarts (memory zeroed): the gateway reconnects and rewrites, then resumes.
                plc.stop()
                wait_until(lambda: not runner.connected, 10, "the loss noticed")
                memory[:] = bytes(len(memory))
                plc = start_plc(port, memory)
                wait_until(lambda: block("cam1")["InspectionID"] == 1, 10, "state rewritten after reconnect")
                camera.send_frame("cam1", 6, flat_frame(48, 48))
                wait_until(lambda: block("cam1")["InspectionID"] == 2 and block("cam1")["OK"], 10, "frame 6")
                assert runner.connects == 2
    finally:
        plc.stop()
