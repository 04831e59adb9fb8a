"""Entry points: `llb-edge gateway` (``run_gateway``), its config from file and flags
(``build_config``), and ``GatewayThread`` to run a gateway inside another program."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llb_edge.runtime.gateway.adapters import Adapter
from llb_edge.runtime.gateway.config import (
    MODBUS_PORT,
    WORD_ORDERS,
    CameraConfig,
    GatewayConfig,
    GatewayConfigError,
    ModbusConfig,
    OpcUaServerConfig,
    default_layout,
    load_config,
)
from llb_edge.runtime.gateway.core import Gateway
from llb_edge.runtime.gateway.tags import MODBUS_BLOCK_REGISTERS
from llb_edge.runtime.logs import DEFAULT_LOG_LEVEL, capture_library_logs, configure_json_logging, get_logger, log_event

logger = get_logger("gateway")


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, default_port
    try:
        return host, int(port)
    except ValueError as err:
        raise GatewayConfigError(f"expected HOST:PORT, got {text!r}") from err


def build_config(
    config_path: Path | None = None,
    results_endpoint: str | None = None,
    *,
    cameras: Sequence[str] = (),
    opcua_endpoint: str | None = None,
    modbus_server: str | None = None,
    modbus_client: str | None = None,
    word_order: str | None = None,
    fail_safe_s: float | None = None,
) -> GatewayConfig:
    """The config file (if any) with command-line flags applied; flags add adapters for all cameras."""
    if config_path is not None:
        base = load_config(config_path)
        if cameras:
            raise GatewayConfigError("--camera cannot be combined with a config file: list cameras in it")
        camera_configs = base.cameras
    else:
        camera_configs = tuple(CameraConfig(camera_id) for camera_id in (cameras or ("cam0",)))
        base = GatewayConfig(cameras=camera_configs, adapters=())
    if word_order is not None and word_order not in WORD_ORDERS:
        raise GatewayConfigError(f"word order must be one of {WORD_ORDERS}, got {word_order!r}")
    camera_ids = tuple(camera.camera_id for camera in camera_configs)
    blocks = default_layout(camera_ids, MODBUS_BLOCK_REGISTERS)
    extra: list[Any] = []
    if opcua_endpoint is not None:
        extra.append(OpcUaServerConfig(name="opcua", cameras=camera_ids, endpoint=opcua_endpoint))
    for mode, address in (("server", modbus_server), ("client", modbus_client)):
        if address is not None:
            host, port = _host_port(address, MODBUS_PORT)
            adapter = ModbusConfig(
                name=f"modbus-{mode}", cameras=camera_ids, mode=mode, host=host, port=port, base=blocks
            )
            extra.append(adapter if word_order is None else dataclasses.replace(adapter, word_order=word_order))
    changes: dict[str, Any] = {"adapters": base.adapters + tuple(extra)}
    if results_endpoint is not None:
        changes["results"] = results_endpoint
    if fail_safe_s is not None:
        changes["fail_safe_s"] = fail_safe_s
    config = dataclasses.replace(base, **changes)
    config.validate()
    return config


# asyncua and pymodbus log each failed reconnect attempt as a warning; the gateway's own events
# (adapter_connection_lost, adapter_connect_failed, adapter_reconnected) already carry the error,
# once per backoff step. Their errors still show, as JSON lines like every other line.
PROTOCOL_LIBRARIES = ("asyncua", "pymodbus", "snap7")


async def _serve(config: GatewayConfig, stop_event: threading.Event | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # Windows event loops have no signal handlers
                loop.add_signal_handler(signum, stop.set)

    async def watch_stop_event() -> None:
        while stop_event is not None and not stop_event.is_set() and not stop.is_set():
            await asyncio.sleep(0.05)
        stop.set()

    watcher = asyncio.create_task(watch_stop_event()) if stop_event is not None else None
    gateway = Gateway(config)
    try:
        await gateway.run(stop)
    finally:
        if watcher is not None:
            watcher.cancel()
    return 1 if gateway.failed else 0


def run_gateway(
    config: GatewayConfig,
    *,
    log_level: str = DEFAULT_LOG_LEVEL,
    stop_event: threading.Event | None = None,
) -> int:
    """`llb-edge gateway`: run ``config`` (from :func:`build_config`) until SIGINT/SIGTERM or
    ``stop_event``; returns the exit code."""
    configure_json_logging(log_level)
    # pymodbus, for one, logs "Cancel send, because not connected!" in plain text when the server
    # stops under a polling client.
    capture_library_logs(quiet=PROTOCOL_LIBRARIES)
    log_event(
        logger,
        logging.INFO,
        "gateway_starting",
        results=config.results,
        adapters=[adapter.name for adapter in config.adapters],
    )
    return asyncio.run(_serve(config, stop_event))


class GatewayThread:
    """A gateway on its own event loop in a background thread (embedding, tests, benchmarks)."""

    def __init__(self, config: GatewayConfig, adapters: Sequence[Adapter] | None = None) -> None:
        self.gateway = Gateway(config, adapters)
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="llb-gateway", daemon=True)
        self.error: BaseException | None = None

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.gateway.run(self._stop, self._started)

        try:
            asyncio.run(main())
        except BaseException as err:  # kept for the owner to inspect; a thread cannot raise to it
            self.error = err
            self._started.set()

    def start(self, timeout_s: float = 10.0) -> GatewayThread:
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"gateway did not start within {timeout_s} s")
        if self.error is not None:
            raise RuntimeError("gateway failed to start") from self.error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"gateway did not stop within {timeout_s} s")

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
