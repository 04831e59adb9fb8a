"""The external-data files an ONNX model references, read from its protobuf bytes without onnx.

An ONNX graph may keep tensors in files beside it (``TensorProto.external_data`` entries with key
``location``); ONNX Runtime opens them by that relative path when it loads the model. A bundle
must checksum those files too, so the line runtime (which has no ``onnx`` package) needs to know
them. This walks only the messages that can hold tensors (graphs, nodes, attributes, functions,
training info, sparse tensors) and skips every other field by its length, so a 100 MB model is
walked in milliseconds.
"""

from __future__ import annotations

# Field numbers from onnx.proto (stable since IR version 3; these messages only gain fields).
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE, _FUNCTION, _TRAINING, _ENTRY = range(9)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTRIBUTE},
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {13: _ENTRY},
    _ENTRY: {},
}
_MAX_DEPTH = 64  # graphs nest through If/Loop attributes; real models stay far below this


class OnnxFormatError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise OnnxFormatError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview) -> list[tuple[int, memoryview | None]]:
    """(field number, bytes of a length-delimited field or None) for every field of a message."""
    fields: list[tuple[int, memoryview | None]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
            fields.append((number, None))
        elif wire_type == 1 or wire_type == 5:
            pos += 8 if wire_type == 1 else 4
            fields.append((number, None))
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise OnnxFormatError("a field runs past the end of its message")
            fields.append((number, data[pos : pos + length]))
            pos += length
        else:
            raise OnnxFormatError(f"unsupported protobuf wire type {wire_type}")
    if pos != len(data):
        raise OnnxFormatError("a fixed-size field runs past the end of its message")
    return fields


def _walk(data: memoryview, kind: int, depth: int, found: list[str]) -> None:
    if depth > _MAX_DEPTH:
        raise OnnxFormatError(f"messages nested deeper than {_MAX_DEPTH}")
    children = _CHILDREN[kind]
    for number, value in _fields(data):
        child = children.get(number)
        if child is None or value is None:
            continue
        if child == _ENTRY:
            entry = dict(_fields(value))
            key, location = entry.get(1), entry.get(2)
            if key is not None and bytes(key) == b"location" and location is not None:
                try:
                    found.append(bytes(location).decode("utf-8"))
                except UnicodeDecodeError as err:
                    raise OnnxFormatError("an external-data location is not UTF-8") from err
        else:
            _walk(value, child, depth + 1, found)


def external_data_locations(model_bytes: bytes | memoryview) -> list[str]:
    """Every distinct external-data ``location`` the model's tensors name, in first-seen order.

    Raises OnnxFormatError when the bytes are not a protobuf message.
    """
    found: list[str] = []
    _walk(memoryview(model_bytes), _MODEL, 0, found)
    return list(dict.fromkeys(found))
