"""Siemens S7 adapter (python-snap7's AsyncClient, PUT/GET access).

The CPU needs "Permit access with PUT/GET communication" enabled and the target data block
must be non-optimised (standard access), so that byte offsets mean something. One block of
S7_BLOCK_BYTES per camera at its configured offset in the DB; S7 is big-endian, so there is no
word-order question here:

    byte  type                 tag
    0     BOOL x7 (DBX0.0-0.6) Ready, Busy, ResultValid, OK, NG, Heartbeat, Fault
    1     BYTE                 reserved
    2     UINT                 ResultCode
    4     UINT                 ErrorCode
    6     REAL                 Score
    10    UDINT                DefectArea
    14    ARRAY[0..3] OF UINT  BBox x, y, w, h
    22    UDINT                InspectionID
    26    STRING[16]           ModelVersion (S7 string: max length, actual length, 16 chars)
    44    UDINT                Trigger     (PLC writes)
    48    UDINT                ResultsAck  (PLC writes)

Bytes 0..43 go out in one db_write (one PDU), so the status byte never changes without its data.
"""

from __future__ import annotations

import struct
from typing import Any

from snap7 import AsyncClient

from llb_edge.runtime.gateway.adapters import Adapter, HandshakeInputs, Tags
from llb_edge.runtime.gateway.config import S7Config

STATUS_BITS = ("Ready", "Busy", "ResultValid", "OK", "NG", "Heartbeat", "Fault")
_NUMBERS = struct.Struct(">BBHHfI4HI")  # bytes 0..25
STRING_CHARS = 16
WRITTEN_BYTES = _NUMBERS.size + 2 + STRING_CHARS  # 44
HANDSHAKE_OFFSET = WRITTEN_BYTES  # Trigger, then ResultsAck
_HANDSHAKE = struct.Struct(">II")


def encode_s7_block(tags: Tags) -> bytearray:
    values = tags.by_name()
    status = sum(1 << bit for bit, name in enumerate(STATUS_BITS) if values[name])
    numbers = _NUMBERS.pack(
        status,
        0,
        tags.result_code & 0xFFFF,
        tags.error_code & 0xFFFF,
        tags.score,
        tags.defect_area & 0xFFFFFFFF,
        *(side & 0xFFFF for side in tags.bbox),
        tags.inspection_id & 0xFFFFFFFF,
    )
    text = tags.model_version.encode("ascii", "replace")[:STRING_CHARS]
    return bytearray(numbers + bytes([STRING_CHARS, len(text)]) + text.ljust(STRING_CHARS, b"\0"))


def decode_s7_block(data: bytes) -> dict[str, Any]:
    """Tag values from a camera's block read back (for tools and tests; the PLC reads its DB)."""
    status, _, result_code, error_code, score, area, x, y, w, h, inspection_id = _NUMBERS.unpack_from(data)
    values: dict[str, Any] = {name: bool(status >> bit & 1) for bit, name in enumerate(STATUS_BITS)}
    length = min(data[_NUMBERS.size + 1], STRING_CHARS)
    start = _NUMBERS.size + 2
    values.update(
        ResultCode=result_code,
        ErrorCode=error_code,
        Score=score,
        DefectArea=area,
        BBox=[x, y, w, h],
        InspectionID=inspection_id,
        ModelVersion=bytes(data[start : start + length]).decode("ascii", "replace"),
    )
    if len(data) >= HANDSHAKE_OFFSET + _HANDSHAKE.size:
        values["Trigger"], values["ResultsAck"] = _HANDSHAKE.unpack_from(data, HANDSHAKE_OFFSET)
    return values


class S7Adapter(Adapter):
    """Writes each camera's block into a data block of an S7 CPU."""

    def __init__(self, settings: S7Config) -> None:
        self.settings = settings
        self.name = settings.name
        self.cameras = settings.cameras
        self._client: AsyncClient | None = None

    async def connect(self) -> None:
        client = AsyncClient()
        self._client = client
        await client.connect(self.settings.host, self.settings.rack, self.settings.slot, self.settings.port)

    def _connected(self) -> AsyncClient:
        if self._client is None or not self._client.get_connected():
            raise ConnectionError("S7 connection lost")
        return self._client

    async def write_result(self, camera_id: str, tags: Tags) -> None:
        await self._connected().db_write(self.settings.db, self.settings.offset[camera_id], encode_s7_block(tags))

    async def write_health(self, camera_id: str, tags: Tags) -> None:
        await self.write_result(camera_id, tags)  # one PDU either way; the whole block stays consistent

    async def read_handshake(self, camera_id: str) -> HandshakeInputs:
        start = self.settings.offset[camera_id] + HANDSHAKE_OFFSET
        data = await self._connected().db_read(self.settings.db, start, _HANDSHAKE.size)
        trigger, ack = _HANDSHAKE.unpack(bytes(data))
        return HandshakeInputs(trigger=trigger, ack=ack)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.disconnect()
