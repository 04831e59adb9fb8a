"""Latency from frame send to PLC tag update, through daemon and gateway, on CPU.

    .venv/bin/python bench/gateway_latency.py [--bundle DIR] [--frames 200] [--size 512] [--warmup 10]

Three processes, as on a line PC: the daemon (`serve`, ONNX Runtime on CPU, the contract test
model unless --bundle is given), the gateway (`run_gateway` with its OPC UA server and Modbus
server), and this one, which is both the camera (a PUSH socket sending raw RGB frames encoded as
`llb-edge replay` does, stamped with capture_ts at encode time) and the PLC (an asyncua client and
a pymodbus client polling the camera's InspectionID). One frame is in flight at a time; each
frame's latency is the first poll that sees its id minus its capture_ts. Polling costs ~1 ms per
read on both protocols, so a figure is at most that much late. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq
from asyncua import Client as UaClient
from pymodbus.client import AsyncModbusTcpClient

from llb_edge.protocol import Heartbeat, decode_published, subscription_topics
from llb_edge.runtime.gateway.modbus import decode_registers
from llb_edge.runtime.gateway.tags import TAG_BY_NAME, UDINT
from llb_edge.runtime.replay import encode_rgb_frame

REPO = Path(__file__).resolve().parents[1]
CAMERA = "cam1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def contract_bundle(folder: Path) -> Path:
    """The runtime tests' contract test model (exporting it needs torch, this machine has it)."""
    sys.path.insert(0, str(REPO / "tests" / "runtime"))
    from runtime_harness import export_contract_model, make_bundle

    return make_bundle(folder / "bundle", export_contract_model(folder / "contract.onnx"))


def start(program: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", program, *args], cwd=REPO, env=env, stderr=subprocess.DEVNULL)


DAEMON = """
import sys
from llb_edge.runtime.daemon import ServeOptions, serve
options = ServeOptions(intake=sys.argv[2], results=sys.argv[3], control=None, health_port=None, backend="ort-cpu",
                       max_wait_ms=0.0, ort_threads=1, log_level="WARNING")
sys.exit(serve(sys.argv[1], options))
"""
GATEWAY = """
import sys
from llb_edge.runtime.gateway import build_config, run_gateway
config = build_config(None, sys.argv[1], cameras=["cam1"], opcua_endpoint=sys.argv[2], modbus_server=sys.argv[3])
sys.exit(run_gateway(config, log_level="WARNING"))
"""


def frames(size: int) -> list[np.ndarray]:
    flat = np.full((size, size, 3), 128, np.uint8)
    defect = flat.copy()
    defect[size // 4 : size // 2, size // 4 : size // 2] = 255
    return [flat, defect]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def wait_connected(connect: object, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await connect()  # type: ignore[operator]
            return
        except Exception as err:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reachable: {err}") from err
            await asyncio.sleep(0.3)


async def measure(args: argparse.Namespace, intake: str, results: str, ua_url: str, mb_port: int) -> dict:
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.sndhwm, push.sndtimeo, push.linger = 4, 2000, 0
    push.connect(intake)
    sub = context.socket(zmq.SUB)
    sub.rcvtimeo, sub.linger = 5000, 0
    for topic in subscription_topics():
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(results)
    while not isinstance(decode_published(sub.recv_multipart()), Heartbeat):
        pass  # a heartbeat proves the daemon is up and our subscription live

    ua = UaClient(ua_url, timeout=5)
    await wait_connected(ua.connect, "gateway OPC UA server")
    node = ua.get_node(f"ns=2;s=Inspection.{CAMERA}.InspectionID")
    mb = AsyncModbusTcpClient("127.0.0.1", port=mb_port, timeout=2)

    async def connect_modbus() -> None:
        if not await mb.connect():
            raise ConnectionError("modbus")

    await wait_connected(connect_modbus, "gateway Modbus server")

    async def modbus_id() -> int:
        response = await mb.read_holding_registers(TAG_BY_NAME["InspectionID"].register, count=2, device_id=1)
        return decode_registers(UDINT, response.registers, "big")

    images = frames(args.size)
    samples: dict[str, list[float]] = {"daemon result published": [], "OPC UA tag (server)": [], "Modbus register": []}
    for index in range(1, args.warmup + args.frames + 1):
        # Frame ids 1, 2, ...: the gateway's InspectionID (its count of the camera's results) is the same.
        parts = encode_rgb_frame(CAMERA, index, images[index % 2], "raw")
        sent_at = json.loads(parts[0])["capture_ts"]
        push.send_multipart(parts, copy=False)
        seen: dict[str, float] = {}
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            if "ua" not in seen and await node.read_value() == index:
                seen["ua"] = time.time()
            if "mb" not in seen and await modbus_id() == index:
                seen["mb"] = time.time()
        if len(seen) < 2:
            raise TimeoutError(f"frame {index} never reached the tags: {seen}")
        published = None
        while published is None:
            message = decode_published(sub.recv_multipart())
            if not isinstance(message, Heartbeat) and message[0].frame_id == index:
                published = message[0].published_ts
        if index > args.warmup:
            samples["daemon result published"].append((published - sent_at) * 1000)
            samples["OPC UA tag (server)"].append((seen["ua"] - sent_at) * 1000)
            samples["Modbus register"].append((seen["mb"] - sent_at) * 1000)
        await asyncio.sleep(random.uniform(0.02, 0.05))  # not phase-locked to the gateway's tick
    await ua.disconnect()
    mb.close()
    push.close()
    sub.close()
    context.term()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: the contract test model)")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--size", type=int, default=512, help="frame side in pixels (RGB, raw)")
    args = parser.parse_args()
    logging.getLogger("asyncua").setLevel(logging.ERROR)  # session-timeout notices are not results

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or contract_bundle(Path(tmp))
        intake, results = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        ua_url, mb_port = f"opc.tcp://127.0.0.1:{free_port()}/llb-edge/", free_port()
        processes = [
            start(DAEMON, str(bundle), intake, results),
            start(GATEWAY, results, ua_url, f"127.0.0.1:{mb_port}"),
        ]
        try:
            samples = asyncio.run(measure(args, intake, results, ua_url, mb_port))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()

    model = args.bundle or "contract test model"
    print(f"frame send -> observed; {args.size}x{args.size} RGB raw frames; {model}; ONNX Runtime CPU;")
    print(f"{os.cpu_count()} cores; one frame in flight\n")
    print("| stage (from capture_ts) | N | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for name, values in samples.items():
        print(
            f"| {name} | {len(values)} | {statistics.median(values):.1f} | {percentile(values, 99):.1f} | "
            f"{max(values):.1f} |"
        )


if __name__ == "__main__":
    main()
