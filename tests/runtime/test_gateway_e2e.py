"""replay -> daemon -> gateway -> PLC, with every PLC-side piece a real server from its library.

Per test: an in-process daemon serving the contract test model, a gateway on its own loop thread,
and a "PLC" loop thread hosting what a plant would have: an asyncua server and a pymodbus server
that the gateway's client adapters write into, plus asyncua / pymodbus clients that read the
gateway's own OPC UA and Modbus servers as a PLC or HMI would. Every port is a free loopback port
and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest
from asyncua import Client as UaClient
from asyncua import Server as UaServer
from asyncua import ua
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from runtime_harness import (
    Client,
    daemon_options,
    flat_frame,
    header_bytes,
    running_daemon,
    square_frame,
    wait_until,
)

from llb_edge.protocol import ErrorCode, ResultHeader
from llb_edge.runtime.daemon import Daemon
from llb_edge.runtime.gateway import GatewayThread
from llb_edge.runtime.gateway.config import (
    CameraConfig,
    GatewayConfig,
    ModbusConfig,
    OpcUaClientConfig,
    OpcUaServerConfig,
    ReconnectPolicy,
)
from llb_edge.runtime.gateway.core import RESULT_ERROR_BASE, GatewayError
from llb_edge.runtime.gateway.tags import CLIENT_DEFAULT_TAGS, GATEWAY_TAGS, STATUS_BITS
from llb_edge.runtime.replay import replay

pytest_plugins = ["runtime_fixtures"]  # contract-test-model bundles
pytestmark = pytest.mark.timeout(90)

CAMERAS = ("cam1", "cam2")  # cam2 runs the PLC handshake
FAIL_SAFE_S = 1.0
HEARTBEAT_S = 0.25
PLC_NAMESPACE = "urn:test:plc"
FLAGS = ("Ready", "Busy", "ResultValid", "OK", "NG", "Heartbeat", "Fault")


def free_port() -> int:
    """A free loopback port BELOW the kernel's ephemeral range.

    Servers here are stopped and restarted on the same port. A port from the ephemeral range can
    be taken in between as the local port of any outgoing connection on this busy machine (or of
    a client reconnecting to it), and the restart then fails with "address in use".
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class LoopThread:
    """An asyncio loop in a thread: the PLC side, which must keep serving while the test blocks."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="plc-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout_s: float = 20.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


# ------------------------------------------------------------------------------- the "PLCs"


class PlcOpcUaServer:
    """A PLC's own OPC UA server with Siemens-like types (INT codes, DINT area, BBox as 4 INTs)."""

    TYPES = {
        "ResultCode": ua.VariantType.Int16,
        "ErrorCode": ua.VariantType.Int16,
        "Score": ua.VariantType.Float,
        "DefectArea": ua.VariantType.Int32,
        "InspectionID": ua.VariantType.UInt32,
        "ModelVersion": ua.VariantType.String,
        "BBoxX": ua.VariantType.Int16,
        "BBoxY": ua.VariantType.Int16,
        "BBoxW": ua.VariantType.Int16,
        "BBoxH": ua.VariantType.Int16,
    }

    def __init__(self, port: int) -> None:
        self.url = f"opc.tcp://127.0.0.1:{port}/plc/"
        self.server: UaServer | None = None

    @staticmethod
    def node_id(camera: str, name: str) -> str:
        return f"ns=2;s=PLC.{camera}.{name}"

    async def start(self) -> None:
        server = UaServer()
        await server.init()
        server.set_endpoint(self.url)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        index = await server.register_namespace(PLC_NAMESPACE)
        assert index == 2
        names = [tag for tag in CLIENT_DEFAULT_TAGS if tag != "BBox"] + ["BBoxX", "BBoxY", "BBoxW", "BBoxH"]
        for camera in CAMERAS:
            folder = await server.nodes.objects.add_object(ua.NodeId(f"PLC.{camera}", 2), ua.QualifiedName(camera, 2))
            for name in names:
                variant_type = self.TYPES.get(name, ua.VariantType.Boolean)
                initial = {ua.VariantType.Boolean: False, ua.VariantType.String: "", ua.VariantType.Float: 0.0}
                node = await folder.add_variable(
                    ua.NodeId.from_string(self.node_id(camera, name)),
                    ua.QualifiedName(name, 2),
                    ua.Variant(initial.get(variant_type, 0), variant_type),
                )
                await node.set_writable()
        await server.start()
        self.server = server

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.stop()
        self.server = None

    async def read(self, camera: str) -> dict[str, Any]:
        assert self.server is not None
        names = [tag for tag in CLIENT_DEFAULT_TAGS if tag != "BBox"]
        values = {
            name: self.server.read_attribute_value(ua.NodeId.from_string(self.node_id(camera, name))).Value.Value
            for name in names
        }
        values["BBox"] = [
            self.server.read_attribute_value(ua.NodeId.from_string(self.node_id(camera, f"BBox{side}"))).Value.Value
            for side in "XYWH"
        ]
        return values

    def adapter_config(self) -> OpcUaClientConfig:
        bbox = {camera: {"BBox": [self.node_id(camera, f"BBox{side}") for side in "XYWH"]} for camera in CAMERAS}
        return OpcUaClientConfig(
            name="plc-opcua",
            cameras=CAMERAS,
            url=self.url,
            node_template="ns=2;s=PLC.{camera}.{tag}",
            nodes=bbox,
            timeout_s=1.0,
        )


class PlcModbusServer:
    """A PLC as Modbus server: the gateway's client adapter writes its holding registers."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: ModbusTcpServer | None = None

    async def start(self) -> None:
        device = SimDevice(id=0, simdata=[SimData(address=0, count=64, datatype=DataType.REGISTERS)])
        self.server = ModbusTcpServer(device, address=("127.0.0.1", self.port))
        await self.server.serve_forever(background=True)

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.shutdown()
        self.server = None

    async def registers(self, base: int) -> list[int]:
        assert self.server is not None
        return list(await self.server.async_getValues(0, 3, base, 25))


def decode_registers(registers: list[int], word_order: str) -> dict[str, Any]:
    """Independent of the gateway's encoder: pymodbus' own converters, with the given word order."""
    convert = AsyncModbusTcpClient.convert_from_registers
    kinds = AsyncModbusTcpClient.DATATYPE
    values: dict[str, Any] = {name: bool(registers[0] >> bit & 1) for bit, name in enumerate(STATUS_BITS)}
    values.update(
        ResultCode=registers[1],
        ErrorCode=registers[2],
        Score=convert(registers[3:5], kinds.FLOAT32, word_order=word_order),
        DefectArea=convert(registers[5:7], kinds.UINT32, word_order=word_order),
        BBox=registers[7:11],
        InspectionID=convert(registers[11:13], kinds.UINT32, word_order=word_order),
        ModelVersion=convert(registers[13:21], kinds.STRING).rstrip("\0"),
    )
    return values


# ---------------------------------------------------------------------------------- the rig


class Rig:
    """Daemon + gateway + PLC side; ``sinks`` read one camera's tags from every PLC-side view."""

    def __init__(self, bundle_dir: Path, daemon: Daemon, plc: LoopThread, *, servers: bool, clients: bool) -> None:
        self.bundle_dir = bundle_dir
        self.daemon = daemon
        self.plc = plc
        self.ua_port, self.mb_port = free_port(), free_port()
        self.plc_opcua = PlcOpcUaServer(free_port()) if clients else None
        self.plc_modbus = PlcModbusServer(free_port()) if clients else None
        self.base = {camera: index * 32 for index, camera in enumerate(CAMERAS)}
        self.servers = servers
        self.gateway: GatewayThread | None = None
        self.ua_reader: UaClient | None = None
        self.mb_reader: AsyncModbusTcpClient | None = None

    def start(self) -> None:
        servers, plc, daemon = self.servers, self.plc, self.daemon
        adapters: list[Any] = []
        if servers:
            adapters += [
                OpcUaServerConfig(name="opcua", cameras=CAMERAS, endpoint=f"opc.tcp://127.0.0.1:{self.ua_port}/gw/"),
                ModbusConfig(
                    name="modbus-server",
                    cameras=CAMERAS,
                    mode="server",
                    port=self.mb_port,
                    word_order="little",
                    base=self.base,
                ),
            ]
        if self.plc_opcua is not None and self.plc_modbus is not None:
            plc.run(self.plc_opcua.start())
            plc.run(self.plc_modbus.start())
            adapters += [
                self.plc_opcua.adapter_config(),
                ModbusConfig(
                    name="plc-modbus",
                    cameras=CAMERAS,
                    mode="client",
                    port=self.plc_modbus.port,
                    word_order="big",
                    base=self.base,
                    timeout_s=0.5,
                ),
            ]
        handshake_adapter = "modbus-server" if servers else "plc-modbus"
        self.config = GatewayConfig(
            cameras=(CameraConfig("cam1"), CameraConfig("cam2", handshake=True, handshake_adapter=handshake_adapter)),
            adapters=tuple(adapters),
            results=daemon.endpoints["results"],
            fail_safe_s=FAIL_SAFE_S,
            heartbeat_s=HEARTBEAT_S,
            write_timeout_s=1.0,
            reconnect=ReconnectPolicy(initial_s=0.1, max_s=0.4),
        )
        self.gateway = GatewayThread(self.config).start()
        wait_until(self.ready, 30, "gateway adapters connected and the daemon seen")
        if servers:
            self.plc.run(self._connect_readers())

    @property
    def runners(self) -> dict[str, Any]:
        assert self.gateway is not None
        return {runner.name: runner for runner in self.gateway.gateway.runners}

    def ready(self) -> bool:
        assert self.gateway is not None
        status = self.gateway.gateway.status()
        return status["daemon_seen"] and all(adapter["connected"] for adapter in status["adapters"].values())

    async def _connect_readers(self) -> None:
        self.ua_reader = UaClient(f"opc.tcp://127.0.0.1:{self.ua_port}/gw/", timeout=2)
        await self.ua_reader.connect()
        self.mb_reader = AsyncModbusTcpClient("127.0.0.1", port=self.mb_port, timeout=1)
        assert await self.mb_reader.connect()

    async def _read_opcua(self, camera: str) -> dict[str, Any]:
        assert self.ua_reader is not None
        nodes = [self.ua_reader.get_node(f"ns=2;s=Inspection.{camera}.{tag}") for tag in GATEWAY_TAGS]
        return dict(zip(GATEWAY_TAGS, await self.ua_reader.read_values(nodes), strict=True))

    async def _read_modbus(self, camera: str) -> dict[str, Any]:
        assert self.mb_reader is not None
        response = await self.mb_reader.read_holding_registers(self.base[camera], count=25, device_id=1)
        assert not response.isError(), response
        return decode_registers(response.registers, "little")

    def sinks(self, camera: str) -> dict[str, dict[str, Any]]:
        """Tag values as each PLC-side view sees them right now."""
        views: dict[str, dict[str, Any]] = {}
        if self.ua_reader is not None:
            views["opcua-server"] = self.plc.run(self._read_opcua(camera))
            views["modbus-server (little)"] = self.plc.run(self._read_modbus(camera))
        if self.plc_opcua is not None and self.plc_opcua.server is not None:
            views["opcua-client"] = self.plc.run(self.plc_opcua.read(camera))
        if self.plc_modbus is not None and self.plc_modbus.server is not None:
            registers = self.plc.run(self.plc_modbus.registers(self.base[camera]))
            views["modbus-client (big)"] = decode_registers(registers, "big")
        return views

    def wait_for(
        self, camera: str, what: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 10.0
    ) -> dict:
        seen: dict[str, dict[str, Any]] = {}

        def check() -> bool:
            seen.update(self.sinks(camera))
            return all(predicate(values) for values in seen.values())

        try:
            wait_until(check, timeout_s, what)
        except AssertionError as err:
            raise AssertionError(f"{err}; last seen: {seen}") from None
        return seen

    def close(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()

        async def close_plc() -> None:
            if self.ua_reader is not None:
                await self.ua_reader.disconnect()
            if self.mb_reader is not None:
                self.mb_reader.close()
            for server in (self.plc_opcua, self.plc_modbus):
                if server is not None and server.server is not None:
                    await server.stop()

        with contextlib.suppress(Exception):
            self.plc.run(close_plc())


@contextlib.contextmanager
def rig(bundle_dir: Path, *, servers: bool = True, clients: bool = True) -> Iterator[Rig]:
    plc = LoopThread()
    try:
        # A fixed results port so that a restarted daemon is found on the same endpoint.
        with running_daemon(bundle_dir, results=f"tcp://127.0.0.1:{free_port()}") as daemon:
            setup = Rig(bundle_dir, daemon, plc, servers=servers, clients=clients)
            try:
                setup.start()
                yield setup
            finally:
                setup.close()
    finally:
        plc.close()


def assert_result_tags(
    views: dict[str, dict[str, Any]], result: ResultHeader, inspection_id: int, result_valid: bool
) -> None:
    """Every view holds exactly the tags this daemon result must produce."""
    assert result.error is None and result.score is not None
    ok = result.decision == "OK"
    area, bbox = (0, [0, 0, 0, 0]) if result.region is None else (result.region.area_px, list(result.region.bbox))
    for name, values in views.items():
        expected = {
            "Ready": True,
            "Busy": False,
            "ResultValid": result_valid,
            "OK": ok,
            "NG": not ok,
            "ResultCode": 0 if ok else 1,
            "DefectArea": area,
            "BBox": bbox,
            "InspectionID": inspection_id,
            "Fault": False,
            "ErrorCode": 0,
            "ModelVersion": result.model_version,
        }
        if "FrameID" in values:  # OPC UA only
            expected["FrameID"] = str(result.frame_id)
        got = {key: values[key] for key in expected}
        assert got == expected, f"{name}: {got} != {expected}"
        assert values["Score"] == pytest.approx(result.score, rel=1e-6), name  # REAL: float32 precision


def _write_images(folder: Path) -> list[str]:
    folder.mkdir()
    frames = [
        flat_frame(60, 80),
        square_frame(60, 80, (20, 10, 30, 30)),
        flat_frame(64, 64),
        square_frame(64, 64, (8, 8, 24, 24)),
        square_frame(60, 80, (40, 20, 24, 24)),
    ]
    for index, rgb in enumerate(frames):
        cv2.imwrite(str(folder / f"{index:02d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return ["OK", "NG", "OK", "NG", "NG"]


# ---------------------------------------------------------------------------------- the tests


def test_replayed_stream_ends_in_the_right_tags_on_every_protocol(tmp_path: Path, bundle_dir: Path) -> None:
    expected_decisions = _write_images(tmp_path / "images")
    with rig(bundle_dir) as setup, Client.of(setup.daemon) as watcher:
        stats = replay(tmp_path / "images", setup.daemon.endpoints["intake"], fps=20, camera_id="cam1")
        assert stats.sent == len(expected_decisions)
        results = watcher.headers(len(expected_decisions))
        assert [r.decision for r in results] == expected_decisions
        last = results[-1]
        # InspectionID counts the camera's results: the last of five is 5. ResultValid started False
        # and toggled once per result (the opcua-client writes it in a second request: wait for it).
        toggled = len(results) % 2 == 1
        views = setup.wait_for(
            "cam1", "the last frame's tags", lambda v: v["InspectionID"] == len(results) and v["ResultValid"] == toggled
        )
        assert_result_tags(views, last, inspection_id=len(results), result_valid=toggled)
        assert set(views) == {"opcua-server", "modbus-server (little)", "opcua-client", "modbus-client (big)"}
        # cam2 has the handshake on and the PLC never triggered: nothing of cam1's stream leaks there,
        # and it is NG until proven OK ("no result yet").
        for values in setup.sinks("cam2").values():
            assert values["InspectionID"] == 0 and not values["OK"] and values["NG"]


def test_failed_frame_is_ng_with_its_error_code_and_handshake_echoes_the_trigger(bundle_dir: Path) -> None:
    with rig(bundle_dir) as setup, Client.of(setup.daemon) as camera:
        camera.send_frame("cam1", 76, flat_frame(48, 48))
        setup.wait_for("cam1", "OK for frame 76", lambda v: v["InspectionID"] == 1 and v["OK"])
        # A known camera and frame id with a payload that is no PNG: the daemon answers DECODE_FAILED.
        camera.send([header_bytes(version=1, camera_id="cam1", frame_id=77, encoding="png"), b"not a png"])
        assert camera.headers(2)[-1].error is not None
        views = setup.wait_for("cam1", "frame 77", lambda v: v["InspectionID"] == 2)
        code = int(ErrorCode.DECODE_FAILED)
        for name, values in views.items():
            assert (values["OK"], values["NG"]) == (False, True), name
            assert (values["ResultCode"], values["ErrorCode"]) == (RESULT_ERROR_BASE + code, code), name
            assert not values["Fault"] and values["Ready"], name
        assert views["opcua-server"]["FrameID"] == "77"

        # Handshake (cam2, inputs on the gateway's Modbus server): the PLC writes Trigger = 500.
        async def plc_write(offset: int, value: int) -> None:
            assert setup.mb_reader is not None
            words = AsyncModbusTcpClient.convert_to_registers(
                value, AsyncModbusTcpClient.DATATYPE.UINT32, word_order="little"
            )
            response = await setup.mb_reader.write_registers(setup.base["cam2"] + offset, words, device_id=1)
            assert not response.isError()

        setup.wait_for("cam2", "Ready before the first trigger", lambda v: v["Ready"])
        setup.plc.run(plc_write(21, 500))
        setup.wait_for("cam2", "Busy after the trigger", lambda v: v["Busy"] and not v["Ready"])
        camera.send_frame("cam2", 9001, flat_frame(48, 48))
        views = setup.wait_for("cam2", "the triggered result", lambda v: v["ResultValid"])
        for name, values in views.items():
            assert values["InspectionID"] == 500 and values["OK"] and not values["Busy"], name
            # Issue 13 item 8 (docs step 4): Ready only after the ack.
            assert not values["Ready"], name
        setup.plc.run(plc_write(23, 500))  # ResultsAck
        setup.wait_for("cam2", "ResultValid cleared by the ack", lambda v: not v["ResultValid"] and v["Ready"])
        # The next trigger withdraws the last OK at once: NG while Busy, whoever reads too early.
        setup.plc.run(plc_write(21, 501))
        views = setup.wait_for("cam2", "Busy for trigger 501", lambda v: v["Busy"])
        for name, values in views.items():
            assert (values["OK"], values["NG"], values["ResultValid"], values["Ready"]) == (False, True, False, False)
            assert values["ErrorCode"] == GatewayError.AWAITING_RESULT, name
        camera.send_frame("cam2", 9002, square_frame(48, 48, (8, 8, 20, 20)))
        views = setup.wait_for("cam2", "the result for 501", lambda v: v["ResultValid"] and v["InspectionID"] == 501)
        for name, values in views.items():
            assert values["NG"] and not values["OK"] and values["ErrorCode"] == 0, name


def test_stopping_the_daemon_trips_the_fail_safe_within_the_window(bundle_dir: Path) -> None:
    with rig(bundle_dir, clients=False) as setup, Client.of(setup.daemon) as camera:
        camera.send_frame("cam1", 1, flat_frame(48, 48))
        setup.wait_for("cam1", "OK", lambda v: v["OK"] and v["Ready"])
        first = setup.sinks("cam1")["opcua-server"]["Heartbeat"]
        setup.wait_for("cam1", "the heartbeat toggling", lambda v: v["Heartbeat"] != first, timeout_s=3 * HEARTBEAT_S)

        stopped_at = time.monotonic()
        setup.daemon.stop(timeout_s=10)
        # Issue 13 item 7: the Heartbeat tag stops with the daemon (one more toggle at most, for its
        # last message), not with the fail-safe: nothing toggles from here until Fault.
        time.sleep(2 * HEARTBEAT_S)
        frozen: dict[str, dict[str, Any]] = {}
        while True:
            views = setup.sinks("cam1")
            frozen = frozen or views
            if all(values["Fault"] for values in views.values()):
                break
            for name, values in views.items():
                assert values["Heartbeat"] == frozen[name]["Heartbeat"], f"{name}: heartbeat toggles, daemon dead"
            assert time.monotonic() - stopped_at < FAIL_SAFE_S + 3, "no fault"
        elapsed = time.monotonic() - stopped_at
        assert FAIL_SAFE_S * 0.9 <= elapsed <= FAIL_SAFE_S + 1.0, elapsed
        for name, values in views.items():
            # Issue 13 item 6: the fault is NG, whatever the last result was (here OK).
            assert (values["OK"], values["NG"], values["Ready"], values["ErrorCode"]) == (False, True, False, 200), name
            assert values["ResultCode"] == RESULT_ERROR_BASE + GatewayError.DAEMON_SILENT
        time.sleep(3 * HEARTBEAT_S)
        for name, values in setup.sinks("cam1").items():
            assert values["Heartbeat"] == frozen[name]["Heartbeat"], f"{name}: heartbeat still toggles in a fault"

        # The daemon comes back on the same endpoints: the fault clears, OK needs a new result.
        options = daemon_options(results=setup.daemon.endpoints["results"])
        with Daemon(setup.bundle_dir, options) as daemon, Client.of(daemon) as camera2:
            setup.wait_for("cam1", "recovery", lambda v: not v["Fault"] and v["Ready"] and not v["OK"] and v["NG"])
            first = setup.sinks("cam1")["opcua-server"]["Heartbeat"]
            setup.wait_for("cam1", "toggling again", lambda v: v["Heartbeat"] != first, timeout_s=3 * HEARTBEAT_S)
            camera2.send_frame("cam1", 2, flat_frame(48, 48))
            setup.wait_for("cam1", "OK again", lambda v: v["OK"] and v["InspectionID"] == 2 and v["ErrorCode"] == 0)


def test_gateway_reconnects_after_the_plc_servers_restart(bundle_dir: Path) -> None:
    with rig(bundle_dir, servers=False) as setup, Client.of(setup.daemon) as camera:
        assert setup.plc_opcua is not None and setup.plc_modbus is not None
        camera.send_frame("cam1", 10, flat_frame(48, 48))
        setup.wait_for("cam1", "frame 10", lambda v: v["InspectionID"] == 1 and v["OK"])

        setup.plc.run(setup.plc_opcua.stop())
        setup.plc.run(setup.plc_modbus.stop())
        runners = setup.runners
        wait_until(lambda: not any(r.connected for r in runners.values()), 10, "the gateway noticing both losses")
        camera.send_frame("cam1", 11, square_frame(48, 48, (4, 4, 20, 20)))  # while the PLCs are down
        camera.headers(1)
        time.sleep(0.5)  # a few backoff rounds against closed ports; the gateway must stay up

        setup.plc.run(setup.plc_opcua.start())  # same ports, memory zeroed as after a PLC restart
        setup.plc.run(setup.plc_modbus.start())
        setup.wait_for("cam1", "frame 11 rewritten after reconnect", lambda v: v["InspectionID"] == 2 and v["NG"])
        camera.send_frame("cam1", 12, flat_frame(48, 48))
        setup.wait_for("cam1", "frame 12", lambda v: v["InspectionID"] == 3 and v["OK"] and v["Ready"])
        for runner in runners.values():
            assert runner.connects == 2 and runner.failures >= 1, (runner.name, runner.connects, runner.failures)
