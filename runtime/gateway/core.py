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
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from llb_edge.protocol import (
    DECISION_OK,
    Heartbeat,
    ProtocolError,
    ResultHeader,
    decode_published,
    is_valid_frame_id,
    result_topic_camera,
    subscription_topics,
)
from llb_edge.runtime.gateway.adapters import Adapter, AdapterRunner, HandshakeInputs, Tags, WriteKind
from llb_edge.runtime.gateway.config import (
    CameraConfig,
    GatewayConfig,
    ModbusConfig,
    OpcUaClientConfig,
    OpcUaServerConfig,
    S7Config,
)
from llb_edge.runtime.logs import RateLimitedLog, get_logger, log_event

logger = get_logger("gateway")

RESULT_PASS = 0
RESULT_NG = 1
RESULT_ERROR_BASE = 100  # ResultCode = 100 + ErrorCode when the part was not inspected
UINT16_MAX = 0xFFFF
UINT32_MAX = 0xFFFFFFFF
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite REAL: a bigger score cannot be written as one


class GatewayError(enum.IntEnum):
    """ErrorCode values the gateway itself raises (1..99 are the daemon's protocol ErrorCodes)."""

    NONE = 0
    DAEMON_SILENT = 200  # fail-safe: no heartbeat or result within fail_safe_s
    BAD_RESULT = 201  # a result arrived whose content no tag can carry (wrong types, non-finite numbers)
    TRIGGER_TIMEOUT = 202  # handshake: no result within trigger_timeout_s after a trigger
    AWAITING_RESULT = 203  # no result for the part yet: gateway just started, or handshake Busy=1


class UnusableResultError(ValueError):
    """A result that decoded under the protocol but whose content cannot become tag values."""


Update = tuple[WriteKind, str, Tags]


@dataclass
class _Camera:
    config: CameraConfig
    tags: Tags
    handshake_primed: bool = False  # the PLC's current Trigger value has been read once
    last_trigger: int = 0
    pending_trigger: int | None = None
    triggered_at: float = 0.0
    inspections: int = 0  # the last InspectionID handed out without the handshake
    results: int = 0
    ignored: int = 0  # results that arrived with the handshake on and no trigger pending


def _verdict_withheld(code: int) -> dict[str, Any]:
    """OK/NG and codes for a part without a verdict (yet): NG, and why in the codes."""
    return {"ok": False, "ng": True, "result_code": RESULT_ERROR_BASE + code, "error_code": code}


def _not_inspected(code: int) -> dict[str, Any]:
    """Every result tag for a part that got no inspection result."""
    return {**_verdict_withheld(code), "score": 0.0, "defect_area": 0, "bbox": (0, 0, 0, 0)}


def _finite(value: object, what: str) -> float:
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):  # an int beyond float range
            number = float(value)
    if number is None or not math.isfinite(number):
        raise UnusableResultError(f"{what} must be a finite number, got {value!r:.80}")
    return number


def _clamp(value: float, high: int) -> int:
    return max(0, min(high, int(value)))


def _result_fields(result: ResultHeader) -> dict[str, Any]:
    """Tag values for one daemon result. Anything but a clean "OK" decision is NG.

    The protocol decoder checks a result's structure, not every value's type; whatever a PLC tag
    cannot carry raises UnusableResultError, and the caller answers the part NG.
    """
    if not is_valid_frame_id(result.frame_id):
        raise UnusableResultError(f"frame_id {result.frame_id!r:.80} is not a protocol frame id")
    if result.model_version is not None and not isinstance(result.model_version, str):
        raise UnusableResultError(f"model_version must be a string, got {result.model_version!r:.80}")
    if result.error is not None:
        return _not_inspected(int(result.error.code))
    ok = result.decision == DECISION_OK
    score = 0.0 if result.score is None else _finite(result.score, "score")
    area, bbox = 0, (0, 0, 0, 0)
    if result.region is not None:
        if len(result.region.bbox) != 4:
            raise UnusableResultError(f"region bbox must be [x, y, w, h], got {result.region.bbox!r:.80}")
        area = _clamp(_finite(result.region.area_px, "region area_px"), UINT32_MAX)
        x, y, w, h = (_clamp(_finite(side, "region bbox"), UINT16_MAX) for side in result.region.bbox)
        bbox = (x, y, w, h)
    return {
        "ok": ok,
        "ng": not ok,
        "result_code": RESULT_PASS if ok else RESULT_NG,
        "error_code": int(GatewayError.NONE),
        "score": max(-FLOAT32_MAX, min(FLOAT32_MAX, score)),
        "defect_area": area,
        "bbox": bbox,
    }


def _next_inspection_id(camera: _Camera) -> int:
    # 1, 2, ..., 2**32 - 1, then 1 again: 0 stays "no result yet" for the PLC.
    camera.inspections = camera.inspections % UINT32_MAX + 1
    return camera.inspections


class GatewayCore:
    """Per-camera tag state, the fail-safe watchdog and the handshake; no I/O.

    Every method takes ``now`` (time.monotonic seconds) and returns the writes it caused.
    """

    def __init__(self, cameras: Sequence[CameraConfig], *, fail_safe_s: float, heartbeat_s: float, now: float) -> None:
        self.fail_safe_s = fail_safe_s
        self.heartbeat_s = heartbeat_s
        # NG until proven OK from the start: no part passes before the first result.
        initial = Tags(**_verdict_withheld(int(GatewayError.AWAITING_RESULT)))
        self._cameras = {camera.camera_id: _Camera(camera, initial) for camera in cameras}
        self._started = now
        self._last_seen: float | None = None  # last heartbeat or result from the daemon
        self._heard_since_toggle = False  # the Heartbeat tag toggles only on proof the daemon lives
        self._daemon_ready = False
        self._fault = False
        self._heartbeat = False
        self._next_toggle = now + heartbeat_s
        self._model_version = ""
        self._log = RateLimitedLog(logger, interval_s=5.0)
        self.heartbeats = 0
        self.results = 0
        self.unusable = 0  # results answered NG with BAD_RESULT

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
            "unusable": self.unusable,
            "cameras": {cid: {"results": c.results, "ignored": c.ignored} for cid, c in self._cameras.items()},
        }

    # ---------------------------------------------------------------------------- state rules

    def _with_health(self, camera: _Camera, tags: Tags) -> Tags:
        busy = camera.pending_trigger is not None
        # Handshake: a written result holds Ready at 0 until the PLC acknowledges it.
        awaiting_ack = camera.config.handshake and tags.result_valid
        if self._fault:
            # NG until proven OK: a fault withdraws the last verdict; only a new result restores one.
            tags = tags.replace(**_verdict_withheld(int(GatewayError.DAEMON_SILENT)))
        return tags.replace(
            ready=self.daemon_seen and self._daemon_ready and not self._fault and not busy and not awaiting_ack,
            busy=busy,
            fault=self._fault,
            heartbeat=self._heartbeat,
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
        self._heard_since_toggle = True

    # -------------------------------------------------------------------------------- inputs

    def on_heartbeat(self, heartbeat: Heartbeat, now: float) -> list[Update]:
        self.heartbeats += 1
        self._seen(now)
        # Fields are as the sender typed them: only a real true is ready, only a string a version.
        self._daemon_ready = heartbeat.ready is True and heartbeat.state != "stopping"
        if isinstance(heartbeat.model_version, str):
            self._model_version = heartbeat.model_version
        return self._refresh()

    def _usable_fields(self, result: ResultHeader) -> dict[str, Any]:
        try:
            fields = _result_fields(result)
        except UnusableResultError as err:
            self.unusable += 1
            camera = f"{result.camera_id!r:.80}"
            self._log.log(logging.WARNING, "unusable-result", "unusable_result", camera=camera, error=str(err))
            return _not_inspected(int(GatewayError.BAD_RESULT))
        if result.error is None:
            self._daemon_ready = True  # an inspected frame proves the daemon serves
        if result.model_version is not None:
            self._model_version = result.model_version
        return fields

    def on_result(self, result: ResultHeader, now: float) -> list[Update]:
        self.results += 1
        self._seen(now)
        fields = self._usable_fields(result)
        camera_id = result.camera_id if isinstance(result.camera_id, str) else None
        frame_id = str(result.frame_id) if is_valid_frame_id(result.frame_id) else ""
        return self._answer(camera_id, fields, frame_id)

    def on_unreadable_result(self, camera_id: str, now: float) -> list[Update]:  # noqa: ARG002 - same call shape
        """A message on ``camera_id``'s result topic that does not decode under the protocol: that
        part is answered NG (BAD_RESULT), so the previous part's OK never stands for it. It does not
        count as a sign of life: only decodable heartbeats and results keep the fail-safe off."""
        self.unusable += 1
        return self._answer(camera_id, _not_inspected(int(GatewayError.BAD_RESULT)), "")

    def _answer(self, camera_id: str | None, fields: dict[str, Any], frame_id: str) -> list[Update]:
        camera = self._cameras.get(camera_id) if camera_id is not None else None
        if camera is None:
            return self._refresh()
        updates = self._refresh(skip=camera.config.camera_id)
        camera.results += 1
        if camera.config.handshake:
            if camera.pending_trigger is None:
                camera.ignored += 1  # the PLC did not ask: this part is not the one it waits for
                tags = self._with_health(camera, camera.tags)
                if tags != camera.tags:
                    camera.tags = tags
                    updates.append(("health", camera.config.camera_id, tags))
                return updates
            inspection_id = camera.pending_trigger
            camera.pending_trigger = None
            result_valid = True  # a level, cleared by the PLC's ResultsAck or its next Trigger
        else:
            inspection_id = _next_inspection_id(camera)
            result_valid = not camera.tags.result_valid  # a toggle: every change is one new result
        tags = camera.tags.replace(**fields, inspection_id=inspection_id, frame_id=frame_id, result_valid=result_valid)
        camera.tags = self._with_health(camera, tags)
        updates.append(("result", camera.config.camera_id, camera.tags))
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
                # The new part has no verdict yet: the last part's OK must not pass for this one.
                tags = tags.replace(**_verdict_withheld(int(GatewayError.AWAITING_RESULT)), result_valid=False)
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
        changed = False
        silent_since = self._last_seen if self._last_seen is not None else self._started
        if not self._fault and now - silent_since > self.fail_safe_s:
            self._fault = changed = True
            log_event(
                logger,
                logging.ERROR,
                "fail_safe_tripped",
                silent_s=round(now - silent_since, 3),
                window_s=self.fail_safe_s,
                daemon_seen=self.daemon_seen,
            )
        if not self._fault and self._heard_since_toggle and now >= self._next_toggle:
            # Only a heartbeat or result since the last toggle allows the next: a dead daemon
            # stops the Heartbeat tag within one period, long before the fail-safe window ends.
            self._heartbeat = not self._heartbeat
            self._heard_since_toggle = False
            self._next_toggle = now + self.heartbeat_s
            changed = True
        updates = self._refresh() if changed else []
        if self._fault:
            # Rewritten every tick: whatever else writes the PLC's copy (an HMI, a stray client
            # setting OK) is overwritten within one tick. Tags that changed go as "health" writes.
            changed_ids = {camera_id for _, camera_id, _ in updates}
            updates += [
                ("restore", camera_id, camera.tags)
                for camera_id, camera in self._cameras.items()
                if camera_id not in changed_ids
            ]
        for camera_id, camera in self._cameras.items():
            timeout = camera.config.trigger_timeout_s
            if camera.pending_trigger is None or timeout <= 0 or now - camera.triggered_at <= timeout:
                continue
            tags = camera.tags.replace(
                **_not_inspected(int(GatewayError.TRIGGER_TIMEOUT)),
                inspection_id=camera.pending_trigger,
                frame_id="",
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
        elif isinstance(settings, OpcUaClientConfig):
            from llb_edge.runtime.gateway.opcua import OpcUaClientAdapter

            adapters.append(OpcUaClientAdapter(settings))
        else:
            raise TypeError(f"no adapter for {type(settings).__name__} ({settings.name})")
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
        self.unreadable = 0  # messages the protocol decoder refused
        self.failed_messages = 0  # messages whose handling raised (a bug): logged, counted, survived
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
        return {
            **self.core.status(),
            "unreadable": self.unreadable,
            "failed_messages": self.failed_messages,
            "adapters": adapters,
        }

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
        for topic in subscription_topics():  # every camera: results for others are counted and logged
            sock.setsockopt(zmq.SUBSCRIBE, topic)
        sock.connect(self.config.results)
        return sock

    def _handle(self, parts: list[bytes], now: float) -> None:
        try:
            message = decode_published(parts)
        except ProtocolError as err:
            self.unreadable += 1
            self._log.log(logging.WARNING, "unreadable", "unreadable_message", error=str(err))
            camera_id = result_topic_camera(parts)
            if camera_id in self.core.camera_ids:
                self._dispatch(self.core.on_unreadable_result(camera_id, now))
            return
        if isinstance(message, Heartbeat):
            self._dispatch(self.core.on_heartbeat(message, now))
            return
        result, _ = message
        if result.camera_id not in self.core.camera_ids:
            self._log.log(logging.INFO, "unknown-camera", "result_for_unconfigured_camera", camera=result.camera_id)
        self._dispatch(self.core.on_result(result, now))

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
                    self._handle(parts, time.monotonic())
                except Exception as err:  # a bug on one message must not take every PLC link down with it
                    self.failed_messages += 1
                    self._log.log(logging.ERROR, "message-failed", "message_handling_failed", error=f"{err!r:.300}")
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
