"""Siemens S7 adapter (python-snap7's AsyncClient, PUT/GET access).

The CPU needs "Permit access with PUT/GET communication" enabled and the target data block
must be non-optimised (standard access), so that byte offsets mean something. One block of
S7_BLOCK_BYTES per camera at its configured offset in the DB; where each tag sits is in the tag
table (runtime/gateway/tags.py, explained in docs/gateway.md). S7 is big-endian, so there is no
word-order question here; a STRING[n] is the S7 string: its max length, its actual length, n chars.

The gateway's part of the block (every byte before Trigger) goes out in one db_write (one PDU), so
the status byte never changes without its data.
"""

from __future__ import annotations

from typing import Any

from snap7 import AsyncClient

from llb_edge.runtime.gateway.adapters import Adapter, HandshakeInputs, PlcWriteKind, Tags
from llb_edge.runtime.gateway.config import S7Config
from llb_edge.runtime.gateway.tags import (
    PLC_TAGS,
    S7_HANDSHAKE_BYTE,
    S7_HANDSHAKE_BYTES,
    S7_STATUS_BYTE,
    S7_TAGS,
    S7_WRITTEN_BYTES,
    TAG_BY_NAME,
    Tag,
    TagType,
    pack_status,
    read_back_block,
)


def _encode(kind: TagType, value: Any) -> bytes:
    if kind.chars:
        text = value.encode("ascii", "replace")[: kind.chars]
        return bytes([kind.chars, len(text)]) + text.ljust(kind.chars, b"\0")
    return kind.pack_number(value)


def _decode_tag(tag: Tag, data: bytes, first_byte: int = 0) -> Any:
    """``tag``'s value in ``data`` (read from ``first_byte`` of the block on); None if it ends before it."""
    start = (tag.s7_byte or 0) - first_byte
    if len(data) < start + tag.type.s7_bytes:
        return None
    if tag.type.chars:
        length = min(data[start + 1], tag.type.chars)
        return bytes(data[start + 2 : start + 2 + length]).decode("ascii", "replace")
    return tag.type.unpack_number(data, start)


def encode_s7_block(tags: Tags) -> bytearray:
    """The S7_WRITTEN_BYTES bytes of one camera's block."""
    values = tags.by_name()
    data = bytearray(S7_WRITTEN_BYTES)
    data[S7_STATUS_BYTE] = pack_status(values)
    for tag in S7_TAGS:
        if tag.writer == "gateway" and tag.s7_byte is not None:
            data[tag.s7_byte : tag.s7_byte + tag.type.s7_bytes] = _encode(tag.type, values[tag.name])
    return data


def decode_s7_block(data: bytes) -> dict[str, Any]:
    """Tag values from a camera's block read back (for tools and tests; the PLC reads its DB)."""
    return read_back_block(data[S7_STATUS_BYTE], S7_TAGS, lambda tag: _decode_tag(tag, data))


class S7Adapter(Adapter[S7Config]):
    """Writes each camera's block into a data block of an S7 CPU."""

    def __init__(self, settings: S7Config) -> None:
        super().__init__(settings)
        self._client: AsyncClient | None = None

    async def connect(self) -> None:
        client = AsyncClient()
        self._client = client
        await client.connect(self.settings.host, self.settings.rack, self.settings.slot, self.settings.port)

    def _connected(self) -> AsyncClient:
        if self._client is None or not self._client.get_connected():
            raise ConnectionError("S7 connection lost")
        return self._client

    async def write(self, camera_id: str, tags: Tags, kind: PlcWriteKind) -> None:
        # Every kind writes the whole block: one PDU either way, and the block stays consistent.
        await self._connected().db_write(self.settings.db, self.settings.offset[camera_id], encode_s7_block(tags))

    async def read_handshake(self, camera_id: str) -> HandshakeInputs:
        start = self.settings.offset[camera_id] + S7_HANDSHAKE_BYTE
        data = bytes(await self._connected().db_read(self.settings.db, start, S7_HANDSHAKE_BYTES))
        trigger, ack = (_decode_tag(TAG_BY_NAME[name], data, S7_HANDSHAKE_BYTE) for name in PLC_TAGS)
        return HandshakeInputs(trigger=trigger, ack=ack)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.disconnect()
