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
from llb_edge.runtime.gateway.adapters import Adapter, AdapterRunner, HandshakeInputs, PlcWriteKind, Tags
from llb_edge.runtime.gateway.config import AdapterConfig, CameraConfig, ReconnectPolicy, parse_config
from llb_edge.runtime.gateway.core import RESULT_ERROR_BASE, GatewayCore, GatewayError
from llb_edge.runtime.gateway.modbus import decode_block, encode_block
from llb_edge.runtime.gateway.tags import MODBUS_WRITTEN_REGISTERS

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
    assert (tags.score, tags.defect_area, tags.bbox, tags.inspection_id) == (0.25, 70000, (1, 2, 300, 400), 1)
    assert tags.result_valid and tags.model_version == "v7" and tags.frame_id == "5"

    [(_, _, tags)] = gateway.on_result(result(6, None, ErrorCode.DECODE_FAILED), 0.3)
    assert (tags.ok, tags.ng) == (False, True)
    assert (tags.result_code, tags.error_code) == (RESULT_ERROR_BASE + 7, 7)
    assert (tags.score, tags.defect_area, tags.bbox, tags.inspection_id) == (0.0, 0, (0, 0, 0, 0), 2)
    assert not tags.result_valid  # toggled back: one change per result
    # A decision that is not exactly "OK" (none, unknown) is a reject too.
    [(_, _, tags)] = gateway.on_result(result(7, None), 0.4)
    assert (tags.ok, tags.ng, tags.result_code) == (False, True, 1)


def test_inspection_ids_count_results_whatever_the_frame_ids() -> None:
    """Issue 13 item 5: "²" passes str.isdigit() but not int(), 2**32 + 7 used to wrap onto 7, and a
    string id's counter could meet a numeric id. InspectionID is now the gateway's own count."""
    gateway = core()
    frame_ids: list[int | str] = ["²", 2**32 + 7, 7, "000123", "part-a", 1]
    seen = [gateway.on_result(result(frame_id), 0.1 * n)[-1][2] for n, frame_id in enumerate(frame_ids, 1)]
    assert [tags.inspection_id for tags in seen] == [1, 2, 3, 4, 5, 6]
    assert [tags.frame_id for tags in seen] == ["²", str(2**32 + 7), "7", "000123", "part-a", "1"]
    assert all(tags.ok for tags in seen) and gateway.unusable == 0
    # After 2**32 - 1 results the count starts over at 1: 0 stays "no result yet".
    gateway._cameras["cam1"].inspections = 2**32 - 2
    assert [gateway.on_result(result(n), 1.0)[-1][2].inspection_id for n in range(3)] == [2**32 - 1, 1, 2]


def hostile(**fields: object) -> ResultHeader:
    """A result header with values the protocol's decoder refuses, built past it: the state machine
    must not trust its caller to have checked them (defence in depth behind decode_result)."""
    region = fields.pop("region", {"area_px": 5, "bbox": [1, 2, 3, 4]})
    values: dict[str, object] = {"camera_id": "cam1", "frame_id": 9, "decision": "OK", "score": 0.2,
                                 "model_version": "v7"}
    bbox = region["bbox"]  # type: ignore[index]
    return ResultHeader(**(values | fields),  # type: ignore[arg-type]
                        region=Region(region["area_px"], tuple(bbox) if isinstance(bbox, list) else bbox))


def test_an_unreadable_result_is_that_parts_ng() -> None:
    gateway = core()
    gateway.on_heartbeat(heartbeat(), 0.0)
    assert gateway.on_result(result(1, "OK"), 0.1)[-1][2].ok
    [(kind, _, tags)] = gateway.on_unreadable_result("cam1", 0.2)
    code = int(GatewayError.BAD_RESULT)
    assert (kind, tags.ok, tags.ng, tags.error_code, tags.inspection_id) == ("result", False, True, code, 2)
    assert gateway.unusable == 1 and gateway.results == 1  # not a result, and not a sign of life


@pytest.mark.parametrize(
    "fields",
    [
        {"score": "0.1"},
        {"score": float("nan")},
        {"score": float("inf")},
        {"score": 10**400},
        {"score": True},
        {"region": {"area_px": 5, "bbox": ["a", "b", "c", "d"]}},
        {"region": {"area_px": 5, "bbox": [1, 2, 3]}},
        {"region": {"area_px": 5, "bbox": "wxyz"}},
        {"model_version": {"v": 1}},
        {"frame_id": {"id": 1}},
        {"frame_id": -1},
        {"frame_id": ""},
    ],
    ids=repr,
)
def test_a_result_no_tag_can_carry_is_answered_ng_not_raised(fields: dict[str, object]) -> None:
    gateway = core()
    gateway.on_heartbeat(heartbeat(), 0.0)
    gateway.on_result(result(1, "OK"), 0.1)
    [(kind, _, tags)] = gateway.on_result(hostile(**fields), 0.2)
    code = int(GatewayError.BAD_RESULT)
    assert (kind, tags.ok, tags.ng, tags.error_code, tags.result_code) == ("result", False, True, code, 100 + code)
    assert (tags.score, tags.defect_area, tags.bbox, tags.inspection_id) == (0.0, 0, (0, 0, 0, 0), 2)
    assert gateway.unusable == 1 and tags.model_version == "v7"
    assert gateway.on_result(result(3, "OK"), 0.3)[-1][2].ok  # the next good result is OK again


def test_results_for_odd_cameras_and_extreme_values_keep_the_gateway_serving() -> None:
    gateway = core()
    gateway.on_heartbeat(heartbeat(), 0.0)
    assert gateway.on_result(hostile(camera_id=["cam1"]), 0.1) == []  # nobody's camera: no tag changes
    assert gateway.on_result(hostile(camera_id={"a": 1}), 0.1) == []
    [(_, _, tags)] = gateway.on_result(hostile(score=1e300, region={"area_px": 10**20, "bbox": [-5, 2.7, 1e9, 3]}), 0.2)
    # Finite but beyond the PLC types: clamped, still the daemon's OK.
    assert tags.ok and tags.score == pytest.approx(3.4028234663852886e38) and tags.defect_area == 2**32 - 1
    assert tags.bbox == (0, 2, 65535, 3)
    # Encodable on every protocol (a score beyond REAL used to fail every write and loop reconnects).
    assert len(encode_block(tags, "big")) == MODBUS_WRITTEN_REGISTERS


def test_fail_safe_trips_after_the_window_and_recovers() -> None:
    gateway = core()
    gateway.on_heartbeat(heartbeat(), 0.0)
    gateway.on_result(result(), 0.5)
    assert gateway.tags("cam1").ok
    gateway.tick(0.5 + WINDOW - 0.01)
    assert not gateway.fault
    updates = gateway.tick(0.5 + WINDOW + 0.01)
    tags = gateway.tags("cam1")
    assert gateway.fault and updates and updates[-1][0] == "health"
    # Issue 13 item 6: "NG until proven OK" means NG=1 in a fault, not only OK=0.
    assert (tags.fault, tags.ok, tags.ng, tags.ready) == (True, False, True, False)
    assert (tags.error_code, tags.result_code) == (GatewayError.DAEMON_SILENT, RESULT_ERROR_BASE + 200)
    frozen = tags.heartbeat
    for step in range(1, 6):  # the heartbeat stops while faulted
        updates = gateway.tick(0.5 + WINDOW + step)
        assert gateway.tags("cam1").heartbeat == frozen
        # Issue 13 item 2: every fault tick rewrites the tags, so OK set by another writer of the
        # PLC's copy lasts one tick.
        assert updates == [("restore", "cam1", gateway.tags("cam1"))]
    gateway.on_heartbeat(heartbeat(), 10.0)
    tags = gateway.tags("cam1")
    assert (tags.fault, tags.ready) == (False, True)
    assert (tags.ok, tags.ng, tags.error_code) == (False, True, 200), "the verdict must wait for a new result"
    assert gateway.tick(10.5) == [], "no rewrites once the fault is over"
    gateway.tick(11.01)
    assert gateway.tags("cam1").heartbeat != frozen
    [(_, _, tags)] = gateway.on_result(result(), 11.1)
    assert (tags.ok, tags.ng, tags.error_code, tags.result_code) == (True, False, 0, 0)


def test_heartbeat_tag_stops_with_the_daemon_before_the_fail_safe_trips() -> None:
    """Issue 13 item 7: the Heartbeat tag was the gateway's own timer; it now toggles only when a
    daemon heartbeat or result arrived since the last toggle."""
    gateway = core()
    toggles = []
    for step in range(1, 100):  # 4.95 s in 50 ms ticks; the daemon sends every 0.5 s and dies at 2.0 s
        now = round(step * 0.05, 2)
        if now <= 2.0 and step % 10 == 0:
            gateway.on_heartbeat(heartbeat(), now)
        before = gateway.tags("cam1").heartbeat
        gateway.tick(now)
        if gateway.tags("cam1").heartbeat != before:
            toggles.append(now)
    assert toggles == [1.5, 2.5], toggles  # first contact at 0.5 s, one period later, then one more
    assert not gateway.fault  # the fail-safe (3 s) has not tripped yet: the Heartbeat was first


def test_no_daemon_at_startup_faults_and_stopping_drops_ready() -> None:
    gateway = core()
    tags = gateway.tags("cam1")  # NG until proven OK, from the start
    assert (tags.ok, tags.ng, tags.error_code, tags.result_code) == (False, True, 203, RESULT_ERROR_BASE + 203)
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
    assert kind == "result" and tags.inspection_id == 42 and tags.result_valid and tags.ok and not tags.busy
    # Issue 13 item 8 (docs step 4): Ready comes back with the ack, not with the result.
    assert not tags.ready
    assert gateway.on_handshake("cam1", HandshakeInputs(trigger=42, ack=41), 0.4) == []  # wrong id
    [(_, _, tags)] = gateway.on_handshake("cam1", HandshakeInputs(trigger=42, ack=42), 0.5)
    assert not tags.result_valid and tags.ok and tags.ready  # the ack clears the strobe, not the result
    # A new Trigger withdraws the last part's verdict while Busy: NG, "awaiting result".
    [(_, _, tags)] = gateway.on_handshake("cam1", HandshakeInputs(trigger=43, ack=42), 1.0)
    assert (tags.busy, tags.ready, tags.result_valid, tags.ok, tags.ng) == (True, False, False, False, True)
    assert (tags.error_code, tags.result_code) == (203, RESULT_ERROR_BASE + 203)
    # No result within trigger_timeout_s: answered NG with TRIGGER_TIMEOUT, Ready again after its ack.
    assert gateway.tick(1.4) == [] or gateway.tags("cam1").busy
    [(kind, _, tags)] = [update for update in gateway.tick(1.6) if update[0] == "result"]
    assert (tags.inspection_id, tags.ng, tags.ok, tags.result_valid, tags.busy) == (43, True, False, True, False)
    assert (tags.error_code, tags.result_code, tags.ready) == (202, RESULT_ERROR_BASE + 202, False)
    [(_, _, tags)] = gateway.on_handshake("cam1", HandshakeInputs(trigger=43, ack=43), 1.7)
    assert tags.ready and not tags.result_valid


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
    assert len(registers) == MODBUS_WRITTEN_REGISTERS and all(0 <= r <= 0xFFFF for r in registers)
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
    modbus = {"m": {"type": "modbus-server"}}
    for factor in (0.5, 0, float("nan")):
        with pytest.raises(GatewayConfigError, match="reconnect_factor"):
            parse_config({"gateway": {"reconnect_factor": factor}, "cameras": {"a": {}}, "adapters": modbus})
    for delays in ({"reconnect_initial_s": float("nan")}, {"reconnect_initial_s": 5.0, "reconnect_max_s": 1.0}):
        with pytest.raises(GatewayConfigError, match="reconnect_initial_s"):
            parse_config({"gateway": delays, "cameras": {"a": {}}, "adapters": modbus})
    flags = build_config(None, "tcp://127.0.0.1:9", cameras=["a", "b"], modbus_client="10.0.0.5:1502")
    [adapter] = flags.adapters
    assert (adapter.host, adapter.port, adapter.base) == ("10.0.0.5", 1502, {"a": 0, "b": 32})


def test_reconnect_delays_grow_by_the_factor_up_to_the_cap() -> None:
    delays = ReconnectPolicy(initial_s=0.5, max_s=2.0, factor=3.0).delays()
    assert [next(delays) for _ in range(4)] == [0.5, 1.5, 2.0, 2.0]


def test_run_gateway_entry_point_stops_on_its_event() -> None:
    runtime_logger, root = logging.getLogger("llb_edge.runtime"), logging.getLogger()
    saved = (list(runtime_logger.handlers), runtime_logger.propagate, runtime_logger.level)
    saved_root = list(root.handlers)
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
    root.handlers[:] = saved_root  # and every other logger's JSON lines (capture_library_logs)
    logging.captureWarnings(False)
    assert codes == [0]


class FlakyAdapter(Adapter[AdapterConfig]):
    """Fails its first two connects, then fails one write; records what was written."""

    def __init__(self) -> None:
        super().__init__(AdapterConfig(name="flaky", cameras=("cam1",)))
        self.connect_calls = 0
        self.fail_next_write = False
        self.written: list[tuple[str, int]] = []

    async def connect(self) -> None:
        self.connect_calls += 1
        if self.connect_calls <= 2:
            raise ConnectionRefusedError("PLC not there yet")

    async def write(self, camera_id: str, tags: Tags, kind: PlcWriteKind) -> None:
        if kind == "result" and self.fail_next_write:
            self.fail_next_write = False
            raise ConnectionResetError("PLC went away")
        self.written.append((kind, tags.inspection_id))

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


def test_restore_writes_reach_only_adapters_whose_tags_others_can_write() -> None:
    adapter = FlakyAdapter()
    runner = AdapterRunner(adapter, ReconnectPolicy(), lambda camera_id: Tags())
    runner.connected = True
    runner.submit("restore", "cam1", Tags(inspection_id=1))  # a PLC's memory: rewritten
    adapter.tags_writable_by_others = False  # the gateway's own server: nothing to restore
    runner.submit("restore", "cam1", Tags(inspection_id=2))
    assert list(runner._pending) == [("health", "cam1", Tags(inspection_id=1))]
