"""The gateway against hostile input (issue 13): PLC clients writing where they should not, results
whose content the protocol decoder lets through, and log lines that are not JSON.

The "daemon" here is a bare ZeroMQ PUB socket publishing hand-made messages (a real daemon cannot be
made to send them), the PLC side real pymodbus / asyncua clients and servers on loopback.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import zmq
from asyncua import Client as UaClient
from asyncua import ua
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.logging import Log as PymodbusLog
from runtime_harness import wait_until
from test_gateway_e2e import LoopThread, PlcModbusServer, free_port

from llb_edge.protocol import Heartbeat, encode_heartbeat
from llb_edge.runtime.gateway import GatewayThread
from llb_edge.runtime.gateway.adapters import Tags
from llb_edge.runtime.gateway.config import (
    CameraConfig,
    GatewayConfig,
    ModbusConfig,
    OpcUaClientConfig,
    OpcUaServerConfig,
)
from llb_edge.runtime.gateway.core import RESULT_ERROR_BASE, GatewayError
from llb_edge.runtime.gateway.modbus import decode_block
from llb_edge.runtime.gateway.opcua import OpcUaClientAdapter, OpcUaServerAdapter, server_node_id
from llb_edge.runtime.gateway.run import PROTOCOL_LIBRARIES
from llb_edge.runtime.gateway.tags import STATUS_BITS
from llb_edge.runtime.logs import capture_library_logs

pytestmark = pytest.mark.timeout(60)

ILLEGAL_FUNCTION, ILLEGAL_ADDRESS = 1, 2
FAULT_STATUS = sum(1 << STATUS_BITS.index(name) for name in ("NG", "Fault"))
OK_STATUS = 1 << STATUS_BITS.index("OK")


def modbus_server_config(port: int, **changes: Any) -> GatewayConfig:
    values: dict[str, Any] = {
        "cameras": (CameraConfig("cam1"), CameraConfig("cam2")),
        "adapters": (
            ModbusConfig(
                name="mb", cameras=("cam1", "cam2"), mode="server", port=port, base={"cam1": 0, "cam2": 32}
            ),
        ),
        "results": f"tcp://127.0.0.1:{free_port()}",  # nobody there unless a test binds it
        "fail_safe_s": 0.3,
        "heartbeat_s": 0.25,
    }
    return GatewayConfig(**(values | changes))


def exception_code(response: Any) -> int | None:
    return response.exception_code if response.isError() else None


# ------------------------------------------------------------------------------------- Modbus


async def attack_modbus_server(port: int) -> dict[str, Any]:
    """What a PLC-side client gets for each way of writing the gateway's block."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    assert await client.connect()
    try:
        before = (await client.read_holding_registers(0, count=64, device_id=1)).registers
        writes = {
            "FC6 status word = OK": client.write_register(0, OK_STATUS, device_id=1),
            "FC16 the whole block": client.write_registers(0, [OK_STATUS] + [0] * 20, device_id=1),
            "FC16 from ResultsAck into reserved": client.write_registers(23, [1, 2, 3], device_id=1),
            "FC6 reserved": client.write_register(25, 1, device_id=1),
            "FC6 cam2 status, unit 7": client.write_register(32, OK_STATUS, device_id=7),
        }
        aliases = {
            "FC5 coil 3 (OK bit)": client.write_coil(3, True, device_id=1),
            "FC15 coils": client.write_coils(0, [False, False, False, True], device_id=1),
            "FC1 read coils": client.read_coils(0, count=16, device_id=1),
            "FC2 read discrete inputs": client.read_discrete_inputs(0, count=16, device_id=1),
            "FC4 read input registers": client.read_input_registers(0, count=4, device_id=1),
            "FC22 mask write": client.mask_write_register(address=0, and_mask=0, or_mask=OK_STATUS, device_id=1),
            "FC23 read/write": client.readwrite_registers(
                read_address=0, read_count=1, write_address=0, values=[OK_STATUS], device_id=1
            ),
        }
        refused = {name: exception_code(await request) for name, request in (writes | aliases).items()}
        after = (await client.read_holding_registers(0, count=64, device_id=1)).registers
        # The documented PLC registers: Trigger and ResultsAck of each camera, functions 16 and 6.
        allowed = [
            exception_code(await client.write_registers(21, [0, 7, 0, 9], device_id=1)),
            exception_code(await client.write_register(54, 5, device_id=1)),
        ]
        handshake = (await client.read_holding_registers(0, count=64, device_id=1)).registers
    finally:
        client.close()
    return {"before": before, "after": after, "refused": refused, "allowed": allowed, "handshake": handshake}


def test_modbus_server_refuses_every_write_but_the_plc_registers() -> None:
    """Issue 13 item 2: FC6 0x0008 to register 0 used to show OK=1, Fault=0 during a fault."""
    port = free_port()
    with GatewayThread(modbus_server_config(port)) as thread:
        wait_until(lambda: thread.gateway.core.fault and thread.gateway.runners[0].connected, 10, "faulted, serving")
        time.sleep(0.1)  # the fault written
        outcome = asyncio.run(attack_modbus_server(port))
    assert outcome["before"][0] == FAULT_STATUS and outcome["before"][32] == FAULT_STATUS
    wrong_address = {name for name in outcome["refused"] if name.startswith(("FC6", "FC16"))}
    assert outcome["refused"] == {
        name: ILLEGAL_ADDRESS if name in wrong_address else ILLEGAL_FUNCTION for name in outcome["refused"]
    }
    assert outcome["after"] == outcome["before"], "a refused request changed registers"
    assert outcome["allowed"] == [None, None]
    values = decode_block(outcome["handshake"][:25], "big")
    assert (values["Trigger"], values["ResultsAck"], values["OK"], values["Fault"]) == (7, 9, False, True)
    assert outcome["handshake"][53:55] == [0, 5]


def test_modbus_client_mode_rewrites_the_plc_block_every_fault_tick() -> None:
    """Client mode: the PLC's memory can be written by anyone on its network (an HMI, a stray
    client). During a fault the gateway rewrites its block every tick, so a forged OK lasts one."""
    plc_loop = LoopThread()
    plc = PlcModbusServer(free_port())
    try:
        plc_loop.run(plc.start())
        config = GatewayConfig(
            cameras=(CameraConfig("cam1"),),
            adapters=(ModbusConfig(name="plc", cameras=("cam1",), mode="client", port=plc.port, base={"cam1": 0}),),
            results=f"tcp://127.0.0.1:{free_port()}",
            fail_safe_s=0.3,
        )

        def status_word() -> int:
            return plc_loop.run(plc.registers(0))[0]

        with GatewayThread(config):
            wait_until(lambda: status_word() == FAULT_STATUS, 10, "the fault in the PLC's memory")
            assert plc.server is not None
            forged_at = time.monotonic()
            plc_loop.run(plc.server.async_setValues(0, 16, 0, [OK_STATUS]))
            wait_until(lambda: status_word() == FAULT_STATUS, 5, "the forged OK overwritten")
            # 20 ms ticks; the bound allows for a loaded machine, the old gateway never rewrote.
            assert time.monotonic() - forged_at < 1.0
    finally:
        if plc.server is not None:
            plc_loop.run(plc.stop())
        plc_loop.close()


# ------------------------------------------------------------------------------ hostile results


@contextmanager
def fake_daemon(endpoint: str) -> Iterator[zmq.Socket]:
    context = zmq.Context()
    sock = context.socket(zmq.PUB)
    sock.linger = 0
    sock.bind(endpoint)
    try:
        yield sock
    finally:
        sock.close()
        context.term()


def result_parts(camera_id: Any = "cam1", **fields: Any) -> list[bytes]:
    values = {
        "version": 1,
        "camera_id": camera_id,
        "frame_id": 1,
        "decision": "OK",
        "score": 0.1,
        "region": None,
        "model_version": "v1",
        "error": None,
    }
    # json.dumps writes NaN and Infinity, and json.loads on the gateway's side reads them back.
    return [b"result/cam1", json.dumps(values | fields).encode()]


def test_no_result_content_stops_the_gateway_and_bad_content_is_ng() -> None:
    """Issue 13 item 5: frame_id "²" used to end `llb-edge gateway`; 2**32 + 7 became InspectionID 7."""
    config = modbus_server_config(free_port(), fail_safe_s=5.0)
    bad = int(GatewayError.BAD_RESULT)
    # (message, InspectionID after it, OK, ErrorCode). Every message is on cam1's topic: one that
    # does not decode under the protocol (wrong types, non-finite numbers, not JSON) is that part's
    # NG (BAD_RESULT), never a silent drop that leaves the previous part's OK standing.
    script: list[tuple[list[bytes], tuple[int, bool, int]]] = [
        (result_parts(frame_id="²"), (1, True, 0)),
        (result_parts(frame_id=2**32 + 7), (2, True, 0)),
        (result_parts(frame_id=7), (3, True, 0)),
        (result_parts(camera_id=["cam1"]), (4, False, bad)),
        (result_parts(camera_id={"id": "cam1"}), (5, False, bad)),
        (result_parts(score="0.5"), (6, False, bad)),
        (result_parts(score=float("nan")), (7, False, bad)),
        (result_parts(score=1e300), (8, True, 0)),  # finite, beyond REAL: clamped, must still encode
        (result_parts(region={"area_px": 5, "bbox": "wxyz"}), (9, False, bad)),
        (result_parts(model_version={"v": 1}), (10, False, bad)),
        (result_parts(frame_id=None), (11, False, bad)),
        ([b"result/cam1", b'{"version": 1, "camera_id": "cam1"}'], (12, False, bad)),
        ([b"result/cam1", b"\xff\xfe not json"], (13, False, bad)),
        (result_parts(frame_id="last one"), (14, True, 0)),
    ]
    with fake_daemon(config.results) as daemon, GatewayThread(config) as thread:
        gateway = thread.gateway
        heartbeat = Heartbeat(ts=time.time(), seq=1, state="serving", ready=True, model_version="v1")

        def subscribed() -> bool:  # a PUB socket drops what it sends before the SUB is connected
            daemon.send_multipart(encode_heartbeat(heartbeat))
            return gateway.core.daemon_seen and gateway.runners[0].connected

        wait_until(subscribed, 10, "the gateway hearing the fake daemon")
        def handled() -> int:
            return gateway.core.results + gateway.unreadable

        for count, (parts, expected) in enumerate(script, handled() + 1):
            daemon.send_multipart(parts)
            wait_until(lambda count=count: handled() >= count, 5, "the message handled")
            tags = gateway.core.tags("cam1")
            assert (tags.inspection_id, tags.ok, tags.error_code) == expected, (parts, tags)
            assert tags.ng != tags.ok
            if not tags.ok:
                assert tags.result_code == RESULT_ERROR_BASE + tags.error_code
        status = gateway.status()
        assert not gateway.failed and (status["unusable"], status["unreadable"], status["failed_messages"]) == (9, 9, 0)
        # Every tag set stayed writable: no adapter call failed (a score beyond REAL used to).
        assert status["adapters"]["mb"]["failures"] == 0
        assert gateway.core.tags("cam1").frame_id == "last one"


# ------------------------------------------------------------------------------------- OPC UA


async def opcua_server_views(port: int) -> dict[str, Any]:
    adapter = OpcUaServerAdapter(
        OpcUaServerConfig(name="ua", cameras=("cam1",), endpoint=f"opc.tcp://127.0.0.1:{port}/gw/")
    )
    await adapter.connect()
    try:
        await adapter.write("cam1", Tags(bbox=(1, 2, 3, 4), frame_id="²", ok=True), "result")
        async with UaClient(adapter.endpoint, timeout=5) as client:

            def node(tag: str) -> Any:
                return client.get_node(server_node_id(adapter.namespace_index, "cam1", tag))

            bbox = node("BBox")
            views = {
                "value_rank": await bbox.read_value_rank(),
                "array_dimensions": await bbox.read_array_dimensions(),
                "bbox": await bbox.read_value(),
                "bbox_type": await bbox.read_data_type_as_variant_type(),
                "frame_id": await node("FrameID").read_value(),
            }
            try:  # a client may not set OK on the gateway's server
                await node("OK").write_value(ua.Variant(True, ua.VariantType.Boolean))
                views["ok_write"] = "accepted"
            except ua.UaStatusCodeError as err:
                views["ok_write"] = type(err).__name__
            return views
    finally:
        await adapter.close()


def test_opcua_bbox_is_a_one_dimensional_array_of_four_and_frame_id_a_string() -> None:
    """Issue 13 item 17: BBox was published with ValueRank 0 (one or more dimensions)."""
    views = asyncio.run(opcua_server_views(free_port()))
    assert (views["value_rank"], views["array_dimensions"]) == (ua.ValueRank.OneDimension, [4])
    assert views["bbox"] == [1, 2, 3, 4] and views["bbox_type"] == ua.VariantType.UInt16
    assert views["frame_id"] == "²"
    assert views["ok_write"] == "BadUserAccessDenied" or views["ok_write"].startswith("BadNotWritable")


async def refused_client_write(port: int) -> Exception:
    """An opcua-client adapter writing a node its server will not let clients write (the gateway's
    own server plays the PLC: its OK node is read-only to clients)."""
    plc = OpcUaServerAdapter(
        OpcUaServerConfig(name="plc", cameras=("cam1",), endpoint=f"opc.tcp://127.0.0.1:{port}/plc/")
    )
    await plc.connect()
    writer = OpcUaClientAdapter(OpcUaClientConfig(
        name="writer", cameras=("cam1",), url=plc.endpoint, tags=("OK",),
        node_template=f"ns={plc.namespace_index};s=Inspection.{{camera}}.{{tag}}"))
    try:
        await writer.connect()
        with pytest.raises(Exception) as refused:
            await writer.write("cam1", Tags(ok=True), "result")
        return refused.value
    finally:
        await writer.close()
        await plc.close()


def test_a_refused_opcua_write_names_the_node_and_the_status() -> None:
    """The refusal reaches the runner's log as what the PLC said, not as an error of our own making
    (it raised a TypeError from building the status exception)."""
    error = asyncio.run(refused_client_write(free_port()))
    assert isinstance(error, ConnectionError), repr(error)
    assert "Inspection.cam1.OK" in str(error)
    assert "BadUserAccessDenied" in str(error) or "BadNotWritable" in str(error)


# --------------------------------------------------------------------------------------- logs


def test_library_log_lines_come_out_as_json() -> None:
    """Issue 13 item 17: at shutdown pymodbus logged "Cancel send, because not connected!" (plus a
    hex dump of the last frames) through Python's last-resort handler: plain text among JSON lines.
    run_gateway now routes every logger through the JSON formatter."""
    root = logging.getLogger()
    saved = (list(root.handlers), {name: logging.getLogger(name).level for name in PROTOCOL_LIBRARIES})
    stream = io.StringIO()
    try:
        capture_library_logs(quiet=PROTOCOL_LIBRARIES, stream=stream)
        PymodbusLog.error("Cancel send, because not connected!\n>>>>> send: 0x11 0xc8")
        PymodbusLog.warning("Failed to connect {}", "quieted: the gateway's own events say it")
        logging.getLogger("asyncio").error("Task exception was never retrieved")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library's DeprecationWarning", DeprecationWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)
    lines = stream.getvalue().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert [event["logger"] for event in events] == ["pymodbus.logging", "asyncio", "py.warnings"]
    assert events[0]["event"].startswith("Cancel send") and events[0]["level"] == "error"
