"""The gateway: daemon results and heartbeats in, PLC tags out.

Two layers:
- :class:`GatewayCore` is the per-camera state machine and the fail-safe watchdog. It does no I/O
  and takes the time as an argument, so every rule (NG until proven OK, fault on silence, the
  handshake) is decided in one place and can be tested without sockets.
- :class:`Gateway` runs it on one asyncio loop: a ZeroMQ SUB socket decoded with
  ``llb_edge.protocol``, a ticker for the watchdog and the heartbeat, a handshake poller, and one
  :class:`AdapterRunner` per PLC adapter.

Entry points (``run_gateway`` for ``llb-edge gateway``, ``GatewayThread``) live in run.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from llb_edge.protocol import (
    DECISION_OK,
    HEARTBEAT_TOPIC,
    RESULT_TOPIC_PREFIX,
    Heartbeat,
    ProtocolError,
    ResultHeader,
    decode_published,
)
from llb_edge.runtime.gateway.adapters import Adapter, AdapterRunner, HandshakeInputs, Tags, WriteKind
from llb_edge.runtime.gateway.config import (
    CameraConfig,
    GatewayConfig,
    ModbusConfig,
    OpcUaServerConfig,
    S7Config,
)
from llb_edge.runtime.logs import RateLimitedLog, get_logger, log_event

logger = get_logger("gateway")

RESULT_PASS = 0
RESULT_NG = 1
RESULT_ERROR_BASE = 100  # ResultCode = 100 + ErrorCode when the part was not inspected
UINT16_MAX = 0xFFFF
UINT32_MASK = 0xFFFFFFFF


class GatewayError(enum.IntEnum):
    """ErrorCode values the gateway itself raises (1..99 are the daemon's protocol ErrorCodes)."""

    NONE = 0
    DAEMON_SILENT = 200  # fail-safe: no heartbeat or result within fail_safe_s
    TRIGGER_TIMEOUT = 202  # handshake: no result within trigger_timeout_s after a trigger


Update = tuple[WriteKind, str, Tags]


@dataclass
class _Camera:
    config: CameraConfig
    tags: Tags
    handshake_primed: bool = False  # the PLC's current Trigger value has been read once
    last_trigger: int = 0
    pending_trigger: int | None = None
    triggered_at: float = 0.0
    string_ids: int = 0  # InspectionIDs handed out for non-numeric frame ids
    results: int = 0
    ignored: int = 0  # results that arrived with the handshake on and no trigger pending


def _clamp(value: float, high: int) -> int:
    return max(0, min(high, int(value)))


def _result_fields(result: ResultHeader) -> dict[str, Any]:
    """Tag values for one daemon result. Anything but a clean "OK" decision is NG."""
    if result.error is not None:
        code = int(result.error.code)
        return {
            "ok": False,
            "ng": True,
            "result_code": RESULT_ERROR_BASE + code,
            "error_code": code,
            "score": 0.0,
            "defect_area": 0,
            "bbox": (0, 0, 0, 0),
        }
    ok = result.decision == DECISION_OK
    region = result.region
    return {
        "ok": ok,
        "ng": not ok,
        "result_code": RESULT_PASS if ok else RESULT_NG,
        "error_code": int(GatewayError.NONE),
        "score": float(result.score) if result.score is not None else 0.0,
        "defect_area": 0 if region is None else _clamp(region.area_px, UINT32_MASK),
        "bbox": (0, 0, 0, 0) if region is None else tuple(_clamp(v, UINT16_MAX) for v in region.bbox),
    }


class GatewayCore:
    """Per-camera tag state, the fail-safe watchdog and the handshake; no I/O.

    Every method takes ``now`` (time.monotonic seconds) and returns the writes it caused.
    """

    def __init__(self, cameras: Sequence[CameraConfig], *, fail_safe_s: float, heartbeat_s: float, now: float) -> None:
        self.fail_safe_s = fail_safe_s
        self.heartbeat_s = heartbeat_s
        self._cameras = {camera.camera_id: _Camera(camera, Tags()) for camera in cameras}
        self._started = now
        self._last_seen: float | None = None  # last heartbeat or result from the daemon
        self._daemon_ready = False
        self._fault = False
        self._heartbeat = False
        self._next_toggle = now + heartbeat_s
        self._model_version = ""
        self.heartbeats = 0
        self.results = 0

    # ------------------------------------------------------------------------------- read-out

    def tags(self, camera_id: str) -> Tags:
        return self._cameras[camera_id].tags

    @property
    def camera_ids(self) -> list[str]:
        return list(self._cameras)

    @property
    def fault(self) -> bool:
        return self._fault

    @property
    def daemon_seen(self) -> bool:
        return self._last_seen is not None

    def status(self) -> dict[str, Any]:
        return {
            "fault": self._fault,
            "daemon_seen": self.daemon_seen,
            "daemon_ready": self._daemon_ready,
            "model_version": self._model_version,
            "heartbeats": self.heartbeats,
            "results": self.results,
            "cameras": {cid: {"results": c.results, "ignored": c.ignored} for cid, c in self._cameras.items()},
        }

    # ---------------------------------------------------------------------------- state rules

    def _with_health(self, camera: _Camera, tags: Tags) -> Tags:
        busy = camera.pending_trigger is not None
        error_code = tags.error_code
        if self._fault:
            error_code = int(GatewayError.DAEMON_SILENT)
        elif error_code == GatewayError.DAEMON_SILENT:
            error_code = int(GatewayError.NONE)
        return tags.replace(
            ready=self.daemon_seen and self._daemon_ready and not self._fault and not busy,
            busy=busy,
            fault=self._fault,
            ok=tags.ok and not self._fault,  # fail-safe: a fault withdraws OK; only a new result restores it
            heartbeat=self._heartbeat,
            error_code=error_code,
            model_version=self._model_version,
        )

    def _refresh(self, skip: str | None = None) -> list[Update]:
        """Health writes for every camera whose tags changed under the current global state."""
        updates: list[Update] = []
        for camera_id, camera in self._cameras.items():
            if camera_id == skip:
                continue
            tags = self._with_health(camera, camera.tags)
            if tags != camera.tags:
                camera.tags = tags
                updates.append(("health", camera_id, tags))
        return updates

    def _seen(self, now: float) -> None:
        if self._last_seen is None or self._fault:
            # First contact or recovery: the heartbeat starts toggling a full period from now.
            self._next_toggle = now + self.heartbeat_s
        if self._fault:
            self._fault = False
            log_event(logger, logging.WARNING, "fail_safe_cleared", silent_s=round(now - (self._last_seen or now), 3))
        self._last_seen = now

    def _inspection_id(self, camera: _Camera, frame_id: int | str) -> int:
        if isinstance(frame_id, int):
            return frame_id & UINT32_MASK
        if frame_id.isdigit():
            return int(frame_id) & UINT32_MASK
        # A PLC InspectionID is a number: non-numeric frame ids get a per-camera counter instead.
        camera.string_ids = (camera.string_ids + 1) & UINT32_MASK
        return camera.string_ids

    # -------------------------------------------------------------------------------- inputs

    def on_heartbeat(self, heartbeat: Heartbeat, now: float) -> list[Update]:
        self.heartbeats += 1
        self._seen(now)
        self._daemon_ready = heartbeat.ready and heartbeat.state != "stopping"
        if heartbeat.model_version is not None:
            self._model_version = heartbeat.model_version
        return self._refresh()

    def on_result(self, result: ResultHeader, now: float) -> list[Update]:
        self.results += 1
        self._seen(now)
        if result.error is None:
            self._daemon_ready = True  # an inspected frame proves the daemon serves
        if result.model_version is not None:
            self._model_version = result.model_version
        camera = self._cameras.get(result.camera_id)
        if camera is None:
            return self._refresh()
        updates = self._refresh(skip=result.camera_id)
        camera.results += 1
        if camera.config.handshake:
            if camera.pending_trigger is None:
                camera.ignored += 1  # the PLC did not ask: this part is not the one it waits for
                tags = self._with_health(camera, camera.tags)
                if tags != camera.tags:
                    camera.tags = tags
                    updates.append(("health", result.camera_id, tags))
                return updates
            inspection_id = camera.pending_trigger
            camera.pending_trigger = None
            result_valid = True  # a level, cleared by the PLC's ResultsAck or its next Trigger
        else:
            inspection_id = self._inspection_id(camera, result.frame_id)
            result_valid = not camera.tags.result_valid  # a toggle: every change is one new result
        tags = camera.tags.replace(**_result_fields(result), inspection_id=inspection_id, result_valid=result_valid)
        camera.tags = self._with_health(camera, tags)
        updates.append(("result", result.camera_id, camera.tags))
        return updates

    def on_handshake(self, camera_id: str, inputs: HandshakeInputs, now: float) -> list[Update]:
        camera = self._cameras[camera_id]
        if not camera.handshake_primed:
            # A Trigger value left over from before the gateway started is not a new request.
            camera.handshake_primed = True
            camera.last_trigger = inputs.trigger
            return []
        tags = camera.tags
        if inputs.trigger != camera.last_trigger:
            camera.last_trigger = inputs.trigger
            if inputs.trigger != 0:
                camera.pending_trigger = inputs.trigger
                camera.triggered_at = now
                tags = tags.replace(result_valid=False)
        acked = inputs.ack != 0 and inputs.ack == tags.inspection_id
        if tags.result_valid and acked and camera.pending_trigger is None:
            tags = tags.replace(result_valid=False)
        tags = self._with_health(camera, tags)
        if tags == camera.tags:
            return []
        camera.tags = tags
        return [("health", camera_id, tags)]

    def tick(self, now: float) -> list[Update]:
        """The watchdog, the heartbeat toggle and handshake timeouts; call often (tens of ms)."""
        updates: list[Update] = []
        silent_since = self._last_seen if self._last_seen is not None else self._started
        if not self._fault and now - silent_since > self.fail_safe_s:
            self._fault = True
            log_event(
                logger,
                logging.ERROR,
                "fail_safe_tripped",
                silent_s=round(now - silent_since, 3),
                window_s=self.fail_safe_s,
                daemon_seen=self.daemon_seen,
            )
            updates += self._refresh()
        if not self._fault and self.daemon_seen and now >= self._next_toggle:
            self._heartbeat = not self._heartbeat
            self._next_toggle += self.heartbeat_s
            if self._next_toggle <= now:  # the loop stalled: do not toggle in bursts to catch up
                self._next_toggle = now + self.heartbeat_s
            updates += self._refresh()
        for camera_id, camera in self._cameras.items():
            timeout = camera.config.trigger_timeout_s
            if camera.pending_trigger is None or timeout <= 0 or now - camera.triggered_at <= timeout:
                continue
            code = int(GatewayError.TRIGGER_TIMEOUT)
            tags = camera.tags.replace(
                ok=False,
                ng=True,
                result_code=RESULT_ERROR_BASE + code,
                error_code=code,
                score=0.0,
                defect_area=0,
                bbox=(0, 0, 0, 0),
                inspection_id=camera.pending_trigger,
                result_valid=True,
            )
            camera.pending_trigger = None
            log_event(logger, logging.WARNING, "trigger_timeout", camera=camera_id, trigger=tags.inspection_id)
            camera.tags = self._with_health(camera, tags)
            updates.append(("result", camera_id, camera.tags))
        return updates


# ---------------------------------------------------------------------------------- the service


def build_adapters(config: GatewayConfig) -> list[Adapter]:
    """Adapter objects for the config (protocol libraries are imported only when used)."""
    adapters: list[Adapter] = []
    for settings in config.adapters:
        if isinstance(settings, ModbusConfig):
            from llb_edge.runtime.gateway.modbus import ModbusClientAdapter, ModbusServerAdapter

            kind = ModbusServerAdapter if settings.mode == "server" else ModbusClientAdapter
            adapters.append(kind(settings))
        elif isinstance(settings, S7Config):
            from llb_edge.runtime.gateway.s7 import S7Adapter

            adapters.append(S7Adapter(settings))
        elif isinstance(settings, OpcUaServerConfig):
            from llb_edge.runtime.gateway.opcua import OpcUaServerAdapter

            adapters.append(OpcUaServerAdapter(settings))
        else:
            from llb_edge.runtime.gateway.opcua import OpcUaClientAdapter

            adapters.append(OpcUaClientAdapter(settings))  # type: ignore[arg-type]
    return adapters


class Gateway:
    """Runs a GatewayCore against a daemon's results socket and a set of adapters (one loop)."""

    TICK_S = 0.02

    def __init__(self, config: GatewayConfig, adapters: Sequence[Adapter] | None = None) -> None:
        config.validate()
        self.config = config
        self.core = GatewayCore(
            config.cameras, fail_safe_s=config.fail_safe_s, heartbeat_s=config.heartbeat_s, now=time.monotonic()
        )
        adapter_list = list(adapters) if adapters is not None else build_adapters(config)
        self.runners = [
            AdapterRunner(adapter, config.reconnect, self.core.tags, call_timeout_s=config.write_timeout_s)
            for adapter in adapter_list
        ]
        self.unreadable = 0
        self.failed = False  # a task ended before stop was asked for (a bug): exit non-zero
        self._log = RateLimitedLog(logger, interval_s=5.0)

    def runner(self, name: str) -> AdapterRunner:
        return next(runner for runner in self.runners if runner.name == name)

    def status(self) -> dict[str, Any]:
        adapters = {
            r.name: {
                "connected": r.connected,
                "connects": r.connects,
                "writes": r.writes,
                "failures": r.failures,
                "last_error": r.last_error,
            }
            for r in self.runners
        }
        return {**self.core.status(), "unreadable": self.unreadable, "adapters": adapters}

    def _dispatch(self, updates: list[Update]) -> None:
        for kind, camera_id, tags in updates:
            for runner in self.runners:
                runner.submit(kind, camera_id, tags)

    def _subscriber(self, context: zmq.asyncio.Context) -> zmq.asyncio.Socket:
        from llb_edge.runtime.keys import configure_client

        sock = context.socket(zmq.SUB)
        sock.linger = 0
        # ZMTP heartbeats notice a dead TCP peer (daemon host gone) so ZeroMQ reconnects by itself.
        sock.heartbeat_ivl, sock.heartbeat_timeout = 1000, 3000
        if self.config.curve_secret is not None and self.config.curve_server_public is not None:
            configure_client(sock, self.config.curve_secret, self.config.curve_server_public)
        for topic in (RESULT_TOPIC_PREFIX, HEARTBEAT_TOPIC):
            sock.setsockopt(zmq.SUBSCRIBE, topic)
        sock.connect(self.config.results)
        return sock

    async def _receive(self, stop: asyncio.Event) -> None:
        context = zmq.asyncio.Context()
        sock = self._subscriber(context)
        log_event(logger, logging.INFO, "gateway_subscribed", results=self.config.results, cameras=self.core.camera_ids)
        try:
            while not stop.is_set():
                if not await sock.poll(100):
                    continue
                parts = await sock.recv_multipart()
                try:
                    message = decode_published(parts)
                except ProtocolError as err:
                    self.unreadable += 1
                    self._log.log(logging.WARNING, "unreadable", "unreadable_message", error=str(err))
                    continue
                now = time.monotonic()
                if isinstance(message, Heartbeat):
                    self._dispatch(self.core.on_heartbeat(message, now))
                    continue
                result, _ = message
                if result.camera_id not in self.core.camera_ids:
                    self._log.log(
                        logging.INFO, "unknown-camera", "result_for_unconfigured_camera", camera=result.camera_id
                    )
                self._dispatch(self.core.on_result(result, now))
        finally:
            sock.close(linger=0)
            context.term()

    async def _tick(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._dispatch(self.core.tick(time.monotonic()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.TICK_S)

    async def _poll_handshakes(self, stop: asyncio.Event) -> None:
        pairs = []
        for camera in self.config.cameras:
            adapter = self.config.handshake_adapter(camera.camera_id) if camera.handshake else None
            if adapter is not None:
                pairs.append((camera.camera_id, self.runner(adapter.name)))
        if not pairs:
            await stop.wait()  # every task lives until stop: one ending early means a bug (see run)
            return
        while not stop.is_set():
            for camera_id, runner in pairs:
                inputs = await runner.read_handshake(camera_id)
                if inputs is not None:
                    self._dispatch(self.core.on_handshake(camera_id, inputs, time.monotonic()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.handshake_poll_s)

    async def run(self, stop: asyncio.Event, started: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set; ``started`` is set once every task runs."""
        tasks = [asyncio.create_task(runner.run(stop), name=f"adapter-{runner.name}") for runner in self.runners]
        tasks += [
            asyncio.create_task(self._receive(stop), name="receive"),
            asyncio.create_task(self._tick(stop), name="tick"),
            asyncio.create_task(self._poll_handshakes(stop), name="handshake"),
        ]
        if started is not None:
            started.set()
        stopped = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopped and not stop.is_set():
                    # A bug, not a PLC problem (those are caught in the runners): stop loudly.
                    self.failed = True
                    error = None if task.cancelled() else task.exception()
                    log_event(logger, logging.ERROR, "gateway_task_ended", task=task.get_name(), error=repr(error))
        finally:
            stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for task, outcome in zip(tasks, results, strict=True):
                if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                    log_event(logger, logging.ERROR, "gateway_task_error", task=task.get_name(), error=repr(outcome))
        log_event(logger, logging.INFO, "gateway_stopped", **self.core.status())
