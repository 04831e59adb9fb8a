"""The PLC tag table (runtime/gateway/tags.py): a consistent table, and the wire layouts derived from it
byte for byte the ones PLC programs were written against (docs/gateway.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from llb_edge.runtime.gateway.adapters import Tags
from llb_edge.runtime.gateway.modbus import decode_block, encode_block
from llb_edge.runtime.gateway.tags import (
    GATEWAY_TAGS,
    MODBUS_BLOCK_REGISTERS,
    MODBUS_STATUS_REGISTER,
    MODBUS_WRITTEN_REGISTERS,
    S7_BLOCK_BYTES,
    S7_STATUS_BYTE,
    S7_WRITTEN_BYTES,
    STATUS_BITS,
    TAGS,
)

SAMPLE = Tags(ready=True, result_valid=True, ng=True, result_code=70001, score=0.1234, defect_area=2**32 + 70000,
              bbox=(1, 2, 300, 65537), inspection_id=2**31 + 5, frame_id="f9", heartbeat=True, error_code=65538,
              model_version="v7-long-version!xyz")
# Recorded from the adapters as they were before the tag table existed (hand-written layouts).
MODBUS_BIG = [53, 4465, 2, 15868, 47396, 1, 4464, 1, 2, 300, 1, 32768, 5, 30263, 11628, 28526, 26413, 30309, 29299,
              26991, 28193]
MODBUS_LITTLE = [53, 4465, 2, 47396, 15868, 4464, 1, 1, 2, 300, 1, 5, 32768, 30263, 11628, 28526, 26413, 30309, 29299,
                 26991, 28193]
S7_SAMPLE = "3500117100023dfcb9240001117000010002012c000180000005101076372d6c6f6e672d76657273696f6e21"
S7_SHORT_VERSION = "48" + "00" * 25 + "1002" + "6162" + "00" * 14


def _spans(positions: list[tuple[str, int, int]]) -> list[tuple[str, range]]:
    return sorted(((name, range(start, start + size)) for name, start, size in positions), key=lambda s: s[1].start)


@pytest.mark.parametrize("protocol", ["modbus", "s7"])
def test_every_tag_has_its_own_place_inside_the_block(protocol: str) -> None:
    if protocol == "modbus":
        status, block = MODBUS_STATUS_REGISTER, MODBUS_BLOCK_REGISTERS
        placed = [(t.name, t.register, t.type.registers) for t in TAGS if t.register is not None]
        status_size = 1
    else:
        status, block = S7_STATUS_BYTE, S7_BLOCK_BYTES
        placed = [(t.name, t.s7_byte, t.type.s7_bytes) for t in TAGS if t.s7_byte is not None]
        status_size = 2  # the status byte and a reserved one: numbers stay word-aligned
    spans = _spans([("status", status, status_size), *placed])
    for (name_a, a), (name_b, b) in zip(spans, spans[1:], strict=False):
        assert a.stop <= b.start, f"{name_a} overlaps {name_b}"
    assert spans[-1][1].stop <= block
    # Every gateway tag except FrameID (OPC UA only) is on both protocols; the BOOLs as status bits.
    on_protocol = {name for name, _, _ in placed} | set(STATUS_BITS)
    assert set(GATEWAY_TAGS) - on_protocol == {"FrameID"}


def test_status_bits_are_the_bool_tags_numbered_from_zero() -> None:
    bools = [t for t in TAGS if t.type.iec == "BOOL"]
    assert sorted(t.status_bit for t in bools) == list(range(len(bools)))
    assert STATUS_BITS == ("Ready", "Busy", "ResultValid", "OK", "NG", "Heartbeat", "Fault")


def test_tags_values_are_the_gateway_tags_of_the_table() -> None:
    assert [f.name for f in dataclasses.fields(Tags)] == [t.value_field for t in TAGS if t.value_field]
    assert tuple(Tags().by_name()) == GATEWAY_TAGS


def test_modbus_layout_is_byte_identical() -> None:
    assert encode_block(SAMPLE, "big") == MODBUS_BIG and encode_block(SAMPLE, "little") == MODBUS_LITTLE
    assert len(MODBUS_BIG) == MODBUS_WRITTEN_REGISTERS == 21
    values = decode_block(MODBUS_BIG + [0, 7, 0, 9], "big")
    assert (values["Trigger"], values["ResultsAck"], values["ModelVersion"]) == (7, 9, "v7-long-version!")


def test_s7_layout_is_byte_identical() -> None:
    s7 = pytest.importorskip("llb_edge.runtime.gateway.s7")
    assert s7.encode_s7_block(SAMPLE).hex() == S7_SAMPLE and S7_WRITTEN_BYTES == 44
    assert s7.encode_s7_block(Tags(model_version="ab", fault=True, ok=True)).hex() == S7_SHORT_VERSION
    values = s7.decode_s7_block(bytes.fromhex(S7_SAMPLE) + bytes([0, 0, 0, 7, 0, 0, 0, 9]))
    assert (values["Trigger"], values["ResultsAck"], values["BBox"]) == (7, 9, [1, 2, 300, 1])


def _doc_rows(section: str) -> list[list[str]]:
    """The table rows (cells, backticks stripped) of a section of docs/gateway.md."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "gateway.md").read_text()
    body = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in body.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    return rows[1:]  # without the header


def test_docs_show_the_table() -> None:
    """docs/gateway.md is what PLC programmers read: its tables must say what the code does."""
    documented = {row[0]: (row[1], row[2]) for row in _doc_rows("Tags")}
    assert documented == {
        t.name: (f"{t.type.opcua}[{t.type.elements}]" if t.type.elements else t.type.opcua, t.type.iec) for t in TAGS}
    modbus = {row[2].split()[0]: (int(row[0]), int(row[1])) for row in _doc_rows("Modbus TCP") if row[2] != "reserved"}
    assert {name: place for name, place in modbus.items() if name != "status"} == {
        t.name: (t.register, t.type.registers) for t in TAGS if t.register is not None}
    s7 = {row[2].split()[0]: (int(row[0]), row[1]) for row in _doc_rows("Siemens S7") if row[2] != "reserved"}
    assert {name: place for name, place in s7.items() if name != "Ready,"} == {
        t.name: (t.s7_byte, t.type.iec) for t in TAGS if t.s7_byte is not None}
