"""The gateway's rules without sockets: state machine, fail-safe, handshake, register encoding,
config parsing, and the adapter runner's reconnect behaviour (with a scripted fake adapter)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from llb_edge.protocol import ErrorCode, ErrorInfo, Heartbeat, Region, ResultHeader
from llb_edge.runtime.gateway import GatewayConfigError, build_config, load_config, run_gateway
from llb_edge.runtime.gateway.adapters import Adapter, AdapterRunner, HandshakeInputs, Tags
from llb_edge.runtime.gateway.config import CameraConfig, ReconnectPolicy, parse_config
from llb_edge.runtime.gateway.core import RESULT_ERROR_BASE, GatewayCore, GatewayError
from llb_edge.runtime.gateway.modbus import WRITTEN_REGISTERS, decode_block, encode_block

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
WINDOW = 3.0


def core(*cameras: CameraConfig) -> GatewayCore:
    return GatewayCore(cameras or (CameraConfig("cam1"),), fail_safe_s=WINDOW, heartbeat_s=1.0, now=0.0)


def heartbeat(ready: bool = True, state: str = "serving") -> Heartbeat:
    return Heartbeat(ts=time.time(), seq=1, state=state, ready=ready, model_version="v7")


def result(frame_id: int | str = 5, decision: str | None = "OK", error: ErrorCode | None = None) -> ResultHeader:
    return ResultHeader(
        camera_id="cam1",
        frame_id=frame_id,
        decision=decision,
        score=None if error else 0.25,
        region=None if error else Region(area_px=70000, bbox=(1, 2, 300, 400)),
        model_version="v7",
        error=None if error is None else ErrorInfo(error, "broken"),
    )


def test_results_map_to_tags_and_a_failed_frame_is_never_ok() -> None:
    gateway = core()
    gateway.on_heartbeat(heartbeat(), 0.1)
    [(kind, camera, tags)] = gateway.on_result(result(5, "OK"), 0.2)
    assert (kind, camera) == ("result", "cam1")
    assert (tags.ok, tags.ng, tags.result_code, tags.error_code, tags.ready) == (True, False, 0, 0, True)
    assert (tags.score, tags.defect_area, tags.bbox, tags.inspection_id) == (0.25, 70000, (1, 2, 300, 400), 5)
    assert tags.result_valid and tags.model_version == "v7"

    [(_, _, tags)] = gateway.on_result(result(6, None, ErrorCode.DECODE_FAILED), 0.3)
    assert (tags.ok, tags.ng) == (False, True)
    assert (tags.result_code, tags.error_code) == (RESULT_ERROR_BASE + 7, 7)
    assert (tags.score, tags.defect_area, tags.bbox, tags.inspection_id) == (0.0, 0, (0, 0, 0, 0), 6)
    assert not tags.result_valid  # toggled back: one change per result
    # A decision that is not exactly "OK" (none, unknown) is a reject too.
    [(_, _, tags)] = gateway.on_result(result(7, None), 0.4)
    assert (tags.ok, tags.ng, tags.result_code) == (False, True, 1)


def test_inspection_ids_from_string_frame_ids() -> None:
    gateway = core()
    assert gateway.on_result(result("000123"), 0.1)[-1][2].inspection_id == 123
    assert gateway.on_result(result("part-a"), 0.2)[-1][2].inspection_id == 1
    assert gateway.on_result(result("part-b"), 0.3)[-1][2].inspection_id == 2
    assert gateway.on_result(result(2**32 + 9), 0.4)[-1][2].inspection_id == 9  # UDINT wraps


def test_fail_safe_trips_after_the_window_and_recovers() -> None:
    gateway = core()
    gateway.on_heartbeat(heartbeat(), 0.0)
    gateway.on_result(result(), 0.5)
    assert gateway.tags("cam1").ok
    assert not gateway.tick(0.5 + WINDOW - 0.01) or not gateway.fault  # heartbeat toggles only
    assert not gateway.fault
    updates = gateway.tick(0.5 + WINDOW + 0.01)
    tags = gateway.tags("cam1")
    assert gateway.fault and updates and updates[-1][0] == "health"
    assert (tags.fault, tags.ok, tags.ready, tags.error_code) == (True, False, False, GatewayError.DAEMON_SILENT)
    frozen = tags.heartbeat
    for step in range(1, 6):  # the heartbeat stops while faulted
        gateway.tick(0.5 + WINDOW + step)
        assert gateway.tags("cam1").heartbeat == frozen
    gateway.on_heartbeat(heartbeat(), 10.0)
    tags = gateway.tags("cam1")
    assert (tags.fault, tags.ready, tags.error_code) == (False, True, 0)
    assert not tags.ok, "OK must wait for a new result after a fault"
    gateway.tick(11.01)
    assert gateway.tags("cam1").heartbeat != frozen


def test_no_daemon_at_startup_faults_and_stopping_drops_ready() -> None:
    gateway = core()
    gateway.tick(WINDOW - 0.1)
    assert not gateway.fault and not gateway.tags("cam1").ready and not gateway.tags("cam1").heartbeat
    gateway.tick(WINDOW + 0.1)
    assert gateway.fault
    fresh = core()
    fresh.on_heartbeat(heartbeat(), 0.0)
    assert fresh.tags("cam1").ready
    fresh.on_heartbeat(heartbeat(ready=False, state="stopping"), 0.5)
    assert not fresh.tags("cam1").ready and not fresh.fault


def test_heartbeat_toggles_once_per_period() -> None:
    gateway = core()
    gateway.on_heartbeat(heartbeat(), 0.0)
    values = []
    for step in range(1, 70):  # 3.45 s in 50 ms ticks, daemon heartbeats keep coming
        now = step * 0.05
        gateway.on_heartbeat(heartbeat(), now)
        gateway.tick(now)
        values.append(gateway.tags("cam1").heartbeat)
    changes = sum(a != b for a, b in zip(values, values[1:], strict=False))
    assert changes == 3  # at 1, 2 and 3 s


def test_handshake_trigger_result_ack_and_timeout() -> None:
    gateway = core(CameraConfig("cam1", handshake=True, trigger_timeout_s=0.5))
    gateway.on_heartbeat(heartbeat(), 0.0)
    # A Trigger value found at startup is stale, not a request.
    assert gateway.on_handshake("cam1", HandshakeInputs(trigger=41, ack=0), 0.0) == []
    assert gateway.on_result(result(1), 0.1) == [] and gateway.status()["cameras"]["cam1"]["ignored"] == 1
    [(_, _, tags)] = gateway.on_handshake("cam1", HandshakeInputs(trigger=42, ack=0), 0.2)
    assert tags.busy and not tags.ready and not tags.result_valid
    [(kind, _, tags)] = gateway.on_result(result(2, "OK"), 0.3)
    assert kind == "result" and tags.inspection_id == 42 and tags.result_valid and tags.ok and tags.ready
    assert gateway.on_handshake("cam1", HandshakeInputs(trigger=42, ack=41), 0.4) == []  # wrong id
    [(_, _, tags)] = gateway.on_handshake("cam1", HandshakeInputs(trigger=42, ack=42), 0.5)
    assert not tags.result_valid and tags.ok  # the ack clears the strobe, not the result
    # No result within trigger_timeout_s: answered NG with TRIGGER_TIMEOUT.
    gateway.on_handshake("cam1", HandshakeInputs(trigger=43, ack=42), 1.0)
    assert gateway.tick(1.4) == [] or gateway.tags("cam1").busy
    [(kind, _, tags)] = [update for update in gateway.tick(1.6) if update[0] == "result"]
    assert (tags.inspection_id, tags.ng, tags.ok, tags.result_valid, tags.busy) == (43, True, False, True, False)
    assert (tags.error_code, tags.result_code) == (202, RESULT_ERROR_BASE + 202)


@pytest.mark.parametrize("word_order", ["big", "little"])
def test_modbus_block_round_trips_and_matches_pymodbus(word_order: str) -> None:
    tags = Tags(
        ready=True,
        result_valid=True,
        ng=True,
        result_code=1,
        score=0.1234,
        defect_area=70000,
        bbox=(1, 2, 300, 65535),
        inspection_id=2**31 + 5,
        heartbeat=True,
        model_version="v7-long-version!",
    )
    registers = encode_block(tags, word_order)
    assert len(registers) == WRITTEN_REGISTERS and all(0 <= r <= 0xFFFF for r in registers)
    kinds = AsyncModbusTcpClient.DATATYPE
    convert = AsyncModbusTcpClient.convert_to_registers
    assert registers[3:5] == convert(0.1234, kinds.FLOAT32, word_order=word_order)
    assert registers[5:7] == convert(70000, kinds.UINT32, word_order=word_order)
    assert registers[11:13] == convert(2**31 + 5, kinds.UINT32, word_order=word_order)
    assert registers[0] == 0b110101  # bits 0 Ready, 2 ResultValid, 4 NG, 5 Heartbeat
    values = decode_block(registers, word_order)
    assert values["Score"] == pytest.approx(0.1234, rel=1e-6)
    assert (values["DefectArea"], values["InspectionID"], values["BBox"]) == (70000, 2**31 + 5, [1, 2, 300, 65535])
    assert values["ModelVersion"] == "v7-long-version!" and values["Ready"] and not values["OK"]


def test_config_example_and_errors(tmp_path: Path) -> None:
    config = load_config(REPO / "configs" / "gateway.example.toml")
    assert [camera.camera_id for camera in config.cameras] == ["cam1", "cam2"]
    assert config.handshake_adapter("cam2").name == "plc"
    with pytest.raises(GatewayConfigError, match="unknown keys"):
        parse_config({"gateway": {"fail_safe": 3}, "cameras": {"cam1": {}}})
    with pytest.raises(GatewayConfigError, match="overlap"):
        parse_config(
            {"cameras": {"a": {}, "b": {}}, "adapters": {"m": {"type": "modbus-client", "base": {"a": 0, "b": 10}}}}
        )
    with pytest.raises(GatewayConfigError, match="word_order"):
        parse_config({"cameras": {"a": {}}, "adapters": {"m": {"type": "modbus-server", "word_order": "middle"}}})
    with pytest.raises(GatewayConfigError, match="no adapters"):
        build_config(None, cameras=["cam1"])
    flags = build_config(None, "tcp://127.0.0.1:9", cameras=["a", "b"], modbus_client="10.0.0.5:1502")
    [adapter] = flags.adapters
    assert (adapter.host, adapter.port, adapter.base) == ("10.0.0.5", 1502, {"a": 0, "b": 32})


def test_run_gateway_entry_point_stops_on_its_event() -> None:
    runtime_logger = logging.getLogger("llb_edge.runtime")
    saved = (list(runtime_logger.handlers), runtime_logger.propagate, runtime_logger.level)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stop = threading.Event()
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(
            run_gateway(
                build_config(None, "tcp://127.0.0.1:1", modbus_server=f"127.0.0.1:{port}", fail_safe_s=0.2),
                stop_event=stop,
            )
        )
    )
    thread.start()
    time.sleep(0.5)  # no daemon at all: the gateway faults, and keeps running
    stop.set()
    thread.join(10)
    # run_gateway set up JSON logging on stderr, as the CLI wants; leave other tests' logging as it was.
    runtime_logger.handlers[:], runtime_logger.propagate, runtime_logger.level = saved
    assert codes == [0]


class FlakyAdapter(Adapter):
    """Fails its first two connects, then fails one write; records what was written."""

    def __init__(self) -> None:
        self.name = "flaky"
        self.cameras = ("cam1",)
        self.connect_calls = 0
        self.fail_next_write = False
        self.written: list[tuple[str, int]] = []

    async def connect(self) -> None:
        self.connect_calls += 1
        if self.connect_calls <= 2:
            raise ConnectionRefusedError("PLC not there yet")

    async def write_result(self, camera_id: str, tags: Tags) -> None:
        if self.fail_next_write:
            self.fail_next_write = False
            raise ConnectionResetError("PLC went away")
        self.written.append(("result", tags.inspection_id))

    async def write_health(self, camera_id: str, tags: Tags) -> None:
        self.written.append(("health", tags.inspection_id))

    async def close(self) -> None:
        raise OSError("closing a broken connection may fail too")


def test_runner_backs_off_reconnects_and_keeps_result_order() -> None:
    async def scenario() -> tuple[FlakyAdapter, AdapterRunner]:
        adapter = FlakyAdapter()
        current = {"cam1": Tags(inspection_id=0)}
        runner = AdapterRunner(adapter, ReconnectPolicy(initial_s=0.01, max_s=0.04), current.__getitem__)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        while not runner.connected:
            await asyncio.sleep(0.005)
        assert adapter.connect_calls == 3 and runner.connects == 1
        runner.submit("result", "cam1", Tags(inspection_id=1))
        runner.submit("health", "cam1", Tags(inspection_id=1))
        runner.submit("health", "cam1", Tags(inspection_id=2))  # coalesces with the queued health
        runner.submit("result", "cam1", Tags(inspection_id=3))
        while len(adapter.written) < 4:
            await asyncio.sleep(0.005)
        adapter.fail_next_write = True
        current["cam1"] = Tags(inspection_id=4)
        runner.submit("result", "cam1", current["cam1"])
        while runner.connects < 2 or not adapter.written or adapter.written[-1] != ("result", 4):
            await asyncio.sleep(0.005)
        stop.set()
        await asyncio.wait_for(task, 2)
        return adapter, runner

    adapter, runner = asyncio.run(asyncio.wait_for(scenario(), 10))
    # The initial full write, then the queue in order; after the failed write, the reconnect
    # rewrites the current snapshot.
    assert adapter.written[:4] == [("result", 0), ("result", 1), ("health", 2), ("result", 3)]
    assert adapter.written[-1] == ("result", 4)
    assert runner.failures == 1 and "PLC went away" in (runner.last_error or "")
