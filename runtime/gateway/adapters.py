"""The PLC adapter interface, the tag values adapters write, and the runner that keeps an adapter
connected.

An adapter only knows how to talk to one kind of PLC endpoint (OPC UA, Modbus TCP). Everything
about staying alive is the runner's job, so it is the same for every protocol: connect with
exponential backoff, treat any failed or timed-out call as a lost connection, log it, close,
retry, and after a reconnect write every camera's current tags again (the PLC may have restarted
with zeroed memory). Nothing an adapter raises can end the gateway.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from llb_edge.runtime.gateway.config import AdapterConfig, ReconnectPolicy
from llb_edge.runtime.gateway.tags import GATEWAY_TAGS, HEALTH_TAGS, STROBE_TAG, TAGS
from llb_edge.runtime.logs import get_logger, log_event

logger = get_logger("gateway")

# "restore": the unchanged tags again, for PLC memory that others can write too (every fault tick
# does it); the runner passes it on as a "health" write, or drops it for adapters whose tags only
# the gateway can write.
WriteKind = Literal["result", "health", "restore"]
# What reaches an adapter: the runner has turned "restore" into "health" (or dropped it).
PlcWriteKind = Literal["result", "health"]
SettingsT = TypeVar("SettingsT", bound=AdapterConfig)


@dataclass(frozen=True)
class Tags:
    """Every value the gateway shows a PLC for one camera (an immutable snapshot); one field per gateway
    tag of the tag table (runtime/gateway/tags.py, its ``value_field``)."""

    ready: bool = False
    busy: bool = False
    result_valid: bool = False
    ok: bool = False
    ng: bool = False
    result_code: int = 0
    score: float = 0.0
    defect_area: int = 0
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)
    inspection_id: int = 0
    frame_id: str = ""  # the daemon's frame id of the result, as text ("" before the first)
    heartbeat: bool = False
    fault: bool = False
    error_code: int = 0
    model_version: str = ""

    def replace(self, **changes: Any) -> Tags:
        return dataclasses.replace(self, **changes)

    def by_name(self) -> dict[str, Any]:
        """Tag name (as in GATEWAY_TAGS) -> value; arrays as lists."""
        values = {tag.name: getattr(self, tag.value_field) for tag in TAGS if tag.value_field is not None}
        return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}


def ordered_writes(tags: Tags, kind: PlcWriteKind) -> tuple[list[tuple[str, Any]], tuple[str, Any]]:
    """(data tags, strobe) for a write: adapters that cannot write atomically write the strobe last."""
    values = tags.by_name()
    names = HEALTH_TAGS if kind == "health" else GATEWAY_TAGS
    data = [(name, values[name]) for name in names if name != STROBE_TAG]
    return data, (STROBE_TAG, values[STROBE_TAG])


@dataclass(frozen=True)
class HandshakeInputs:
    trigger: int  # the PLC's trigger id; a change to a non-zero value requests an inspection
    ack: int  # the InspectionID the PLC has consumed


class Adapter(abc.ABC, Generic[SettingsT]):
    """One PLC-facing endpoint. Methods may raise anything on failure: the runner handles it."""

    # False for the gateway's own servers, whose tags no client can write: no "restore" writes.
    tags_writable_by_others: bool = True

    def __init__(self, settings: SettingsT) -> None:
        self.settings = settings
        self.name = settings.name
        self.cameras = settings.cameras

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection (a client) or start listening (a server)."""

    @abc.abstractmethod
    async def write(self, camera_id: str, tags: Tags, kind: PlcWriteKind) -> None:
        """Write a camera's tags. "result": every tag of a new result, the data visible no later than
        ResultValid; "health": at least the HEALTH_TAGS (heartbeat, fail-safe and handshake flags)."""

    async def read_handshake(self, camera_id: str) -> HandshakeInputs:
        """Trigger and ResultsAck as the PLC wrote them."""
        raise NotImplementedError(f"{type(self).__name__} has no handshake inputs")

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection or stop the server; must not raise on an already broken one."""


class AdapterRunner:
    """Keeps one adapter connected and feeds it writes in order.

    Result writes queue in order (each toggles ResultValid: dropping one would hide a part from the
    PLC); health writes coalesce to the newest per camera. While disconnected nothing queues: after
    a reconnect every camera's current tags are written in full, which supersedes whatever was
    missed.
    """

    QUEUE_LIMIT = 1000

    def __init__(
        self,
        adapter: Adapter,
        policy: ReconnectPolicy,
        current: Callable[[str], Tags],
        *,
        call_timeout_s: float = 2.0,
        connect_timeout_s: float = 15.0,
    ) -> None:
        self.adapter = adapter
        self._policy = policy
        self._current = current
        self._call_timeout_s = call_timeout_s
        # Connecting may take far longer than a write: an OPC UA server builds its address space.
        self._connect_timeout_s = connect_timeout_s
        self._delays = policy.delays()
        self._pending: deque[tuple[WriteKind, str, Tags]] = deque()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one request at a time on the adapter's connection
        self.connected = False
        self.connects = 0  # successful connects so far (reconnects = connects - 1)
        self.writes = 0
        self.failures = 0
        self.last_error: str | None = None

    @property
    def name(self) -> str:
        return self.adapter.name

    def submit(self, kind: WriteKind, camera_id: str, tags: Tags) -> None:
        if not self.connected or camera_id not in self.adapter.cameras:
            return
        if kind == "restore":
            if not self.adapter.tags_writable_by_others:
                return
            kind = "health"
        if kind == "health":
            for index in range(len(self._pending) - 1, -1, -1):
                pending_kind, pending_camera, _ = self._pending[index]
                if pending_camera == camera_id:
                    # Replace a queued health write in place; behind a queued result it must queue
                    # (the result snapshot would otherwise overwrite the newer health state).
                    if pending_kind == "health":
                        self._pending[index] = (kind, camera_id, tags)
                        self._wake.set()
                        return
                    break
        if len(self._pending) >= self.QUEUE_LIMIT:
            self._pending.popleft()
            log_event(logger, logging.WARNING, "adapter_queue_full", adapter=self.name, limit=self.QUEUE_LIMIT)
        self._pending.append((kind, camera_id, tags))
        self._wake.set()

    async def _call(self, coroutine: Any, timeout_s: float | None = None) -> Any:
        async with self._lock:
            return await asyncio.wait_for(coroutine, timeout_s or self._call_timeout_s)

    async def _disconnect(self, error: BaseException) -> None:
        if not self.connected:
            return  # a concurrent call already reported this loss
        self.connected = False
        self.failures += 1
        self.last_error = f"{type(error).__name__}: {error}"
        self._pending.clear()
        log_event(logger, logging.WARNING, "adapter_connection_lost", adapter=self.name, error=self.last_error)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.adapter.close(), self._call_timeout_s)

    async def read_handshake(self, camera_id: str) -> HandshakeInputs | None:
        """The PLC's inputs, or None while disconnected (a failed read counts as a lost connection)."""
        if not self.connected:
            return None
        try:
            return await self._call(self.adapter.read_handshake(camera_id))
        except Exception as err:  # any failure means: reconnect, never crash
            await self._disconnect(err)
            return None

    async def _connect(self, stop: asyncio.Event) -> bool:
        try:
            await self._call(self.adapter.connect(), self._connect_timeout_s)
        except Exception as err:  # logged and retried: a PLC problem must not end the gateway
            self.last_error = f"{type(err).__name__}: {err}"
            delay = next(self._delays)
            # The first failure is news; repeats every backoff step are not, but stay visible.
            level = logging.WARNING if self.connects == 0 and delay == self._policy.initial_s else logging.INFO
            log_event(logger, level, "adapter_connect_failed", adapter=self.name, error=self.last_error, retry_s=delay)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.adapter.close(), self._call_timeout_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            return False
        self._delays = self._policy.delays()  # the next outage starts again from initial_s
        self.connects += 1
        self.connected = True
        event = "adapter_connected" if self.connects == 1 else "adapter_reconnected"
        log_event(logger, logging.INFO, event, adapter=self.name, cameras=list(self.adapter.cameras))
        # Whatever the PLC holds now (zeros after its restart, or stale values) is replaced.
        self._pending.clear()
        for camera_id in self.adapter.cameras:
            self._pending.append(("result", camera_id, self._current(camera_id)))
        return True

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                if not self.connected:
                    await self._connect(stop)
                    continue
                if not self._pending:
                    self._wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 0.5)
                    continue
                kind, camera_id, tags = self._pending.popleft()
                try:
                    await self._call(self.adapter.write(camera_id, tags, "result" if kind == "result" else "health"))
                    self.writes += 1
                except Exception as err:  # logged and retried: a PLC problem must not end the gateway
                    await self._disconnect(err)
        finally:
            self.connected = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.adapter.close(), self._call_timeout_s)
