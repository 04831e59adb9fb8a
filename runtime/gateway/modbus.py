"""Modbus TCP adapters (pymodbus): a client writing a PLC's holding registers, and a server that
PLCs poll. Both use one register block per camera, starting at the camera's base; where each tag
sits is in the tag table (runtime/gateway/tags.py, explained in docs/gateway.md).

The gateway writes its part of the block (every register before Trigger) in ONE request (function
16): Modbus servers apply a request as a whole, so a PLC never reads a new ResultValid next to old
data. Trigger and ResultsAck belong to the PLC. The gateway's own server (ModbusServerAdapter)
enforces that: clients may read any block register (function 3) and write only the PLC's registers
(functions 6 and 16); any other write is refused with ILLEGAL DATA ADDRESS and any other function
code with ILLEGAL FUNCTION, so no client can set OK.
Bytes inside a register are big-endian (Modbus); only the order of the two words of a 32-bit
value differs between PLC makes, hence ``word_order``: "big" = high word first (Modicon, most
PLCs), "little" = low word first. Strings are bytes, not numbers: 2 characters per register, high
byte first, never word-swapped.
"""

from __future__ import annotations

from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from llb_edge.runtime.gateway.adapters import Adapter, HandshakeInputs, PlcWriteKind, Tags
from llb_edge.runtime.gateway.config import ModbusConfig
from llb_edge.runtime.gateway.tags import (
    MODBUS_BLOCK_REGISTERS,
    MODBUS_HANDSHAKE_REGISTER,
    MODBUS_HANDSHAKE_REGISTERS,
    MODBUS_STATUS_REGISTER,
    MODBUS_TAGS,
    MODBUS_WRITTEN_REGISTERS,
    PLC_TAGS,
    TAG_BY_NAME,
    Tag,
    TagType,
    pack_status,
    read_back_block,
)

# The registers only a PLC writes: every camera's Trigger and ResultsAck.
PLC_REGISTERS = range(MODBUS_HANDSHAKE_REGISTER, MODBUS_HANDSHAKE_REGISTER + MODBUS_HANDSHAKE_REGISTERS)
FC_READ_HOLDING = 3
FC_WRITE_SINGLE = 6
FC_WRITE_MULTIPLE = 16
# The register functions the gateway's server answers; 1, 2, 4, 5, 15, 22 and 23 are refused
# (ILLEGAL FUNCTION): pymodbus keeps coils, discrete inputs and input registers in the same memory
# as the holding registers, so they would read and write the gateway's block under other names.
SERVER_FUNCTION_CODES = (FC_READ_HOLDING, FC_WRITE_SINGLE, FC_WRITE_MULTIPLE)


def _swap_words(words: list[int], word_order: str, element_bytes: int) -> list[int]:
    """``words`` in ``word_order``: "little" reverses the words within each element (a 32-bit value's
    two words), never the elements of an array or the characters of a string."""
    if word_order != "little" or element_bytes <= 2:
        return words
    step = element_bytes // 2
    return [word for start in range(0, len(words), step) for word in reversed(words[start : start + step])]


def encode_registers(kind: TagType, value: Any, word_order: str) -> list[int]:
    """A tag value as its ``kind.registers`` registers."""
    if kind.chars:
        data = value.encode("ascii", "replace")[: kind.chars].ljust(2 * kind.registers, b"\0")
    else:
        data = kind.pack_number(value)
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return words if kind.chars else _swap_words(words, word_order, kind.element_bytes)


def decode_registers(kind: TagType, words: list[int], word_order: str) -> Any:
    """The inverse of :func:`encode_registers`."""
    ordered = words if kind.chars else _swap_words(words, word_order, kind.element_bytes)
    data = b"".join(word.to_bytes(2, "big") for word in ordered)
    if kind.chars:
        return data.rstrip(b"\0").decode("ascii", "replace")
    return kind.unpack_number(data)


def encode_block(tags: Tags, word_order: str) -> list[int]:
    """The MODBUS_WRITTEN_REGISTERS registers of one camera's block."""
    values = tags.by_name()
    registers = [0] * MODBUS_WRITTEN_REGISTERS
    registers[MODBUS_STATUS_REGISTER] = pack_status(values)
    for tag in MODBUS_TAGS:
        if tag.writer == "gateway" and tag.register is not None:
            end = tag.register + tag.type.registers
            registers[tag.register : end] = encode_registers(tag.type, values[tag.name], word_order)
    return registers


def _decode_tag(tag: Tag, registers: list[int], word_order: str, first_register: int = 0) -> Any:
    """``tag``'s value in ``registers`` (read from ``first_register`` of the block on); None if they end before it."""
    start = (tag.register or 0) - first_register
    words = registers[start : start + tag.type.registers]
    return decode_registers(tag.type, words, word_order) if len(words) == tag.type.registers else None


def decode_block(registers: list[int], word_order: str) -> dict[str, Any]:
    """Tag values from a camera block read back (at least MODBUS_WRITTEN_REGISTERS registers; the whole
    block includes the PLC's Trigger/ResultsAck). For tools, demos and tests: the PLC does this in its
    own program."""
    return read_back_block(registers[MODBUS_STATUS_REGISTER], MODBUS_TAGS,
                           lambda tag: _decode_tag(tag, registers, word_order))


class _ModbusAdapter(Adapter[ModbusConfig]):
    async def _write_registers(self, address: int, registers: list[int]) -> None:
        raise NotImplementedError

    async def _read_registers(self, address: int, count: int) -> list[int]:
        raise NotImplementedError

    async def write(self, camera_id: str, tags: Tags, kind: PlcWriteKind) -> None:
        # Every kind writes the whole block: it is one request anyway, and the block stays consistent.
        await self._write_registers(self.settings.base_of(camera_id), encode_block(tags, self.settings.word_order))

    async def read_handshake(self, camera_id: str) -> HandshakeInputs:
        words = await self._read_registers(
            self.settings.base_of(camera_id) + MODBUS_HANDSHAKE_REGISTER, MODBUS_HANDSHAKE_REGISTERS
        )
        trigger, ack = (_decode_tag(TAG_BY_NAME[name], words, self.settings.word_order, MODBUS_HANDSHAKE_REGISTER)
                        for name in PLC_TAGS)
        return HandshakeInputs(trigger=trigger, ack=ack)


class ModbusClientAdapter(_ModbusAdapter):
    """Writes each camera's block into a PLC's holding registers (the PLC is the Modbus server)."""

    def __init__(self, settings: ModbusConfig) -> None:
        super().__init__(settings)
        self._client: AsyncModbusTcpClient | None = None

    async def connect(self) -> None:
        # reconnect_delay=0 turns off pymodbus' own reconnecting: the runner does it, with the
        # same backoff and logging for every protocol.
        client = AsyncModbusTcpClient(
            self.settings.host,
            port=self.settings.port,
            timeout=self.settings.timeout_s,
            retries=0,
            reconnect_delay=0,
        )
        self._client = client
        if not await client.connect():
            raise ConnectionError(f"cannot connect to Modbus server {self.settings.host}:{self.settings.port}")

    def _connected_client(self) -> AsyncModbusTcpClient:
        if self._client is None or not self._client.connected:
            raise ConnectionError("Modbus connection lost")
        return self._client

    async def _write_registers(self, address: int, registers: list[int]) -> None:
        response = await self._connected_client().write_registers(address, registers, device_id=self.settings.unit_id)
        if response.isError():
            raise ConnectionError(f"Modbus write at {address} refused: {response}")

    async def _read_registers(self, address: int, count: int) -> list[int]:
        response = await self._connected_client().read_holding_registers(
            address, count=count, device_id=self.settings.unit_id
        )
        if response.isError():
            raise ConnectionError(f"Modbus read at {address} refused: {response}")
        return list(response.registers)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


class ModbusServerAdapter(_ModbusAdapter):
    """Hosts the register map on a Modbus TCP server; the PLC polls it and writes its handshake."""

    tags_writable_by_others = False  # clients may write Trigger and ResultsAck only

    def __init__(self, settings: ModbusConfig) -> None:
        super().__init__(settings)
        self._server: ModbusTcpServer | None = None
        # The register addresses a client may write: every camera's Trigger and ResultsAck.
        self._plc_writable = frozenset(
            settings.base_of(camera_id) + offset for camera_id in self.cameras for offset in PLC_REGISTERS
        )
        self._writing_own_block = False

    def _device(self) -> SimDevice:
        # One block of registers per camera; addresses outside them answer ILLEGAL ADDRESS.
        blocks = [
            SimData(address=self.settings.base_of(camera_id), count=MODBUS_BLOCK_REGISTERS, datatype=DataType.REGISTERS)
            for camera_id in self.cameras
        ]
        # id 0: answer every unit id, as PLC drivers differ in the unit id they send to a gateway.
        return SimDevice(id=0, simdata=blocks, action=self._guard_writes)

    async def _guard_writes(
        self,
        function_code: int,
        _block_start: int,
        address: int,
        count: int,
        _registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus calls this before any request touches the registers; an ExcCodes refuses it."""
        if self._writing_own_block:
            return None
        if function_code not in SERVER_FUNCTION_CODES:
            return ExcCodes.ILLEGAL_FUNCTION
        touched = range(address, address + count)
        if values is not None and not all(register in self._plc_writable for register in touched):
            return ExcCodes.ILLEGAL_ADDRESS
        return None

    async def connect(self) -> None:
        server = ModbusTcpServer(self._device(), address=(self.settings.host, self.settings.port))
        await server.serve_forever(background=True)
        self._server = server

    def _running(self) -> ModbusTcpServer:
        if self._server is None:
            raise ConnectionError("Modbus server not started")
        return self._server

    async def _write_registers(self, address: int, registers: list[int]) -> None:
        server = self._running()
        # The write guard lets this one through. No client request can run while the flag is
        # set: from here to the guard pymodbus awaits no I/O, so the loop does not switch tasks.
        self._writing_own_block = True
        try:
            await server.async_setValues(0, FC_WRITE_MULTIPLE, address, registers)
        finally:
            self._writing_own_block = False

    async def _read_registers(self, address: int, count: int) -> list[int]:
        return list(await self._running().async_getValues(0, FC_READ_HOLDING, address, count))

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()
