"""The PLC tag table: every tag the gateway shows a PLC, once, with its type and its place on each
protocol. The adapters derive their layouts from it; docs/gateway.md explains it to PLC programmers.

Per camera, each protocol carries the tags as follows:

- OPC UA: one variable per tag, node ``Inspection.<camera>.<Tag>`` on the gateway's own server, or
  the node ids a PLC's server already has (opcua-client adapters).
- Modbus TCP: a block of MODBUS_BLOCK_REGISTERS holding registers from the camera's base register.
  The BOOL tags are bits of the status register; the others start at their ``register``.
- S7: a block of S7_BLOCK_BYTES from the camera's offset in a data block, big-endian. The BOOL tags
  are bits of the status byte (DBX0.0 ...); the others start at their ``s7_byte``.

The gateway writes everything from the start of a block up to its first PLC-written tag in one
request, so a PLC never sees a new ResultValid beside old data; the PLC writes Trigger and ResultsAck.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from llb_edge.protocol import MAX_FRAME_ID_CHARS

MODBUS_BLOCK_REGISTERS = 32  # one camera's register block (the ones after ResultsAck are reserved)
S7_BLOCK_BYTES = 52  # one camera's bytes in the S7 data block
S7_DEFAULT_SPACING_BYTES = 64  # cameras' blocks without a configured offset: 0, 64, 128, ... (room to grow)
MODBUS_STATUS_REGISTER = 0  # the register holding the BOOL tags' bits
S7_STATUS_BYTE = 0  # the byte holding the BOOL tags' bits (the byte after it is reserved)
MODEL_VERSION_CHARS = 16
OPCUA_FOLDER = "Inspection"  # the gateway's OPC UA server: Objects/Inspection/<camera>/<Tag>


@dataclass(frozen=True)
class TagType:
    """A PLC data type and its size on each protocol."""

    iec: str  # the IEC 61131-3 type a PLC programmer declares
    opcua: str  # asyncua VariantType name
    registers: int  # Modbus holding registers a value takes (BOOL: 0, it is a bit of the status register)
    s7_bytes: int  # bytes a value takes in the S7 block (BOOL: 0, it is a bit of the status byte)
    elements: int = 0  # array elements; 0 for a scalar
    chars: int = 0  # STRING[chars]: the most characters a value keeps
    number_format: str = ""  # numbers: the struct format of one element (H, I, f); "" for BOOL and STRING

    @property
    def element_bytes(self) -> int:
        return struct.calcsize(f">{self.number_format}")

    def _layout(self) -> struct.Struct:
        return struct.Struct(f">{max(self.elements, 1)}{self.number_format}")

    def pack_number(self, value: Any) -> bytes:
        """A number (or array of numbers) of this type as big-endian bytes; integers wrap to its width."""
        numbers = list(value) if self.elements else [value]
        if self.number_format != "f":
            mask = (1 << 8 * self.element_bytes) - 1
            numbers = [number & mask for number in numbers]
        return self._layout().pack(*numbers)

    def unpack_number(self, data: bytes, offset: int = 0) -> Any:
        """The inverse of :meth:`pack_number`, reading from ``offset``: arrays as lists."""
        numbers = self._layout().unpack_from(data, offset)
        return list(numbers) if self.elements else numbers[0]


BOOL = TagType("BOOL", "Boolean", registers=0, s7_bytes=0)
UINT = TagType("UINT", "UInt16", registers=1, s7_bytes=2, number_format="H")
UDINT = TagType("UDINT", "UInt32", registers=2, s7_bytes=4, number_format="I")
REAL = TagType("REAL", "Float", registers=2, s7_bytes=4, number_format="f")
UINT_ARRAY_4 = TagType("ARRAY[0..3] OF UINT", "UInt16", registers=4, s7_bytes=8, elements=4, number_format="H")


def string_type(chars: int) -> TagType:
    """STRING[chars]: 2 characters per Modbus register; an S7 string adds its max and actual length bytes."""
    return TagType(f"STRING[{chars}]", "String", registers=(chars + 1) // 2, s7_bytes=chars + 2, chars=chars)


@dataclass(frozen=True)
class Tag:
    name: str  # as a PLC programmer sees it, and the OPC UA node name
    type: TagType
    value_field: str | None  # the field of adapters.Tags holding its value; None: the PLC writes it
    health: bool = False  # changes without a new result (fail-safe, heartbeat, handshake): in health writes
    status_bit: int | None = None  # BOOL tags: bit of the Modbus status register and of the S7 status byte
    register: int | None = None  # first register in the camera's Modbus block; None: not in the block
    s7_byte: int | None = None  # first byte in the camera's S7 block; None: not in the block
    client_default: bool = True  # written by an opcua-client adapter unless its `tags` option says otherwise

    @property
    def writer(self) -> Literal["gateway", "plc"]:
        return "plc" if self.value_field is None else "gateway"


# The order is the OPC UA write order (the strobe, ResultValid, goes last whatever its place here).
TAGS: tuple[Tag, ...] = (
    Tag("Ready", BOOL, "ready", health=True, status_bit=0),
    Tag("Busy", BOOL, "busy", health=True, status_bit=1),
    Tag("ResultValid", BOOL, "result_valid", health=True, status_bit=2),
    Tag("OK", BOOL, "ok", health=True, status_bit=3),
    Tag("NG", BOOL, "ng", health=True, status_bit=4),
    Tag("ResultCode", UINT, "result_code", health=True, register=1, s7_byte=2),
    Tag("Score", REAL, "score", register=3, s7_byte=6),
    Tag("DefectArea", UDINT, "defect_area", register=5, s7_byte=10),
    Tag("BBox", UINT_ARRAY_4, "bbox", register=7, s7_byte=14),
    Tag("InspectionID", UDINT, "inspection_id", register=11, s7_byte=22),
    # FrameID came later than the rest: it has no place in the register and S7 blocks, and PLC data
    # blocks made before it lack the node (a missing node fails an opcua-client connect).
    Tag("FrameID", string_type(MAX_FRAME_ID_CHARS), "frame_id", client_default=False),
    Tag("Heartbeat", BOOL, "heartbeat", health=True, status_bit=5),
    Tag("Fault", BOOL, "fault", health=True, status_bit=6),
    Tag("ErrorCode", UINT, "error_code", health=True, register=2, s7_byte=4),
    Tag("ModelVersion", string_type(MODEL_VERSION_CHARS), "model_version", health=True, register=13, s7_byte=26),
    Tag("Trigger", UDINT, None, register=21, s7_byte=44),
    Tag("ResultsAck", UDINT, None, register=23, s7_byte=48),
)
TAG_BY_NAME = {tag.name: tag for tag in TAGS}

# The gateway writes GATEWAY_TAGS; the PLC writes PLC_TAGS (only read when a camera's handshake is on).
GATEWAY_TAGS = tuple(tag.name for tag in TAGS if tag.writer == "gateway")
PLC_TAGS = tuple(tag.name for tag in TAGS if tag.writer == "plc")
ALL_TAGS = GATEWAY_TAGS + PLC_TAGS
# A "health" write carries only these; a "result" write carries every gateway tag.
HEALTH_TAGS = tuple(tag.name for tag in TAGS if tag.health)
CLIENT_DEFAULT_TAGS = tuple(tag.name for tag in TAGS if tag.writer == "gateway" and tag.client_default)
# The strobe: written after (or atomically with) the data it announces, never before it.
STROBE_TAG = "ResultValid"
# Bit n of the status register / byte, n = 0, 1, ...
STATUS_BITS = tuple(tag.name for tag in sorted((t for t in TAGS if t.status_bit is not None),
                                               key=lambda t: t.status_bit or 0))

# Tags placed by position (the BOOL tags are placed by their status bit instead).
MODBUS_TAGS = tuple(tag for tag in TAGS if tag.register is not None)
S7_TAGS = tuple(tag for tag in TAGS if tag.s7_byte is not None)


def pack_status(values: Mapping[str, Any]) -> int:
    """The status register / byte of a block: bit n set when tag STATUS_BITS[n] is true in ``values``."""
    return sum(1 << bit for bit, name in enumerate(STATUS_BITS) if values[name])


def read_back_block(status: int, placed: Iterable[Tag], decode: Callable[[Tag], Any]) -> dict[str, Any]:
    """Tag values of a block read back: the status bits, then each of ``placed`` that ``decode`` finds
    (None: the data read ends before the tag). For tools, demos and tests; a PLC reads its own block."""
    values: dict[str, Any] = {name: bool(status >> bit & 1) for bit, name in enumerate(STATUS_BITS)}
    for tag in placed:
        value = decode(tag)
        if value is not None:
            values[tag.name] = value
    return values


def opcua_node_name(camera_id: str, tag: str) -> str:
    """The string node id of a camera's tag on the gateway's OPC UA server (without its namespace)."""
    return f"{OPCUA_FOLDER}.{camera_id}.{tag}"


# The PLC's part of a block, Trigger then ResultsAck, read in one request; the gateway's part is
# everything before it, written in one request.
MODBUS_HANDSHAKE_REGISTER = min(tag.register for tag in MODBUS_TAGS if tag.register is not None and tag.writer == "plc")
MODBUS_HANDSHAKE_REGISTERS = sum(TAG_BY_NAME[name].type.registers for name in PLC_TAGS)
MODBUS_WRITTEN_REGISTERS = MODBUS_HANDSHAKE_REGISTER
S7_HANDSHAKE_BYTE = min(tag.s7_byte for tag in S7_TAGS if tag.s7_byte is not None and tag.writer == "plc")
S7_HANDSHAKE_BYTES = sum(TAG_BY_NAME[name].type.s7_bytes for name in PLC_TAGS)
S7_WRITTEN_BYTES = S7_HANDSHAKE_BYTE
