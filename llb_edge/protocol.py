"""Wire protocol v1 between cameras, the line-side daemon, watchers and the PLC gateway.

This module is the one implementation of the protocol (documented for integrators in
docs/protocol.md). It needs numpy and json only: ZeroMQ message parts arrive as anything that
exposes the buffer protocol (bytes, memoryview, ``zmq.Frame``), so the gateway and third-party
tools can use it without the runtime.

Messages
--------
- Frame (camera -> daemon, PUSH/PUB): ``[header JSON, payload]``; payload is the raw pixel buffer
  or the JPEG/PNG file bytes.
- Result (daemon -> subscribers, PUB): ``[topic, header JSON]`` or ``[topic, header JSON, map]``,
  topic ``b"result/<camera_id>"``.
- Heartbeat (daemon -> subscribers, PUB): ``[b"hb", header JSON]``.

Every way a frame message can be wrong maps to one :class:`ErrorCode`; the decoder raises
:class:`ProtocolError` carrying the camera and frame id whenever the header was readable far enough
to know them, so the daemon can answer that frame with an error result instead of going silent.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeGuard

import numpy as np

PROTOCOL_VERSION = 1

ENCODINGS = ("raw", "jpeg", "png")
RAW_DTYPES = ("uint8", "uint16")
RAW_CHANNELS = (1, 3, 4)  # gray, RGB, RGBA (alpha ignored); a 2-D shape means gray
MAP_ENCODINGS = ("uint8", "float16")

HEARTBEAT_TOPIC = b"hb"
RESULT_TOPIC_PREFIX = b"result/"

# The daemon's endpoints unless serve.toml or flags say otherwise (replay, watch, ctl and the gateway
# default to the same): loopback only, so nothing off the machine reaches the daemon until the line
# PC's settings open it.
DEFAULT_INTAKE = "tcp://127.0.0.1:5555"
DEFAULT_RESULTS = "tcp://127.0.0.1:5556"
DEFAULT_CONTROL = "tcp://127.0.0.1:5557"
DEFAULT_HEALTH_HOST = "127.0.0.1"
DEFAULT_HEALTH_PORT = 8765

MAX_HEADER_BYTES = 16 * 1024
# A frame header is an object holding a list; extra fields may nest, but not without end: deep
# nesting is how a hostile JSON text exhausts a recursive parser.
MAX_HEADER_DEPTH = 32
MAX_SIDE = 16384  # pixels per image side; bigger is a corrupt header, not a camera
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024 * 1024

# Camera ids become part of a PUB topic and a metrics label, so they are kept to a safe alphabet.
CAMERA_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_FRAME_ID_CHARS = 128
SHOWN_VALUE_CHARS = 80  # an invalid field's value is quoted in error messages up to this length

DECISION_OK = "OK"
DECISION_NG = "NG"


def is_local_endpoint(endpoint: str) -> bool:
    """True for endpoints only this machine can reach: loopback TCP, ipc:// and inproc://."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or "*": reachable from outside


class ErrorCode(enum.IntEnum):
    """Why a frame got no inspection result. The name travels on the wire; the number is for PLC
    tags (ErrorCode registers) and never changes meaning once released."""

    BAD_MESSAGE = 1  # wrong number of message parts
    BAD_HEADER = 2  # header is not a JSON object, or a required field is missing or invalid
    UNKNOWN_VERSION = 3  # header "version" is present but not one this daemon speaks
    UNKNOWN_ENCODING = 4  # "encoding" is present but not raw, jpeg or png
    BAD_SHAPE = 5  # raw "shape" present but invalid or not matching the payload length
    BAD_DTYPE = 6  # raw "dtype" present but not uint8 or uint16
    DECODE_FAILED = 7  # JPEG/PNG payload is not a file of that format or could not be decoded
    TOO_LARGE = 8  # payload or image (size read from its header) over the daemon's size limits
    DROPPED = 9  # replaced by a newer frame of the same camera (keep-newest queue was full)
    TOO_MANY_CAMERAS = 10  # a camera id beyond the daemon's camera limit
    INFERENCE_FAILED = 11  # the model failed or returned non-finite values for this frame
    INTERNAL = 99  # a bug: the daemon logs it with a traceback


class ProtocolError(ValueError):
    """A message that breaks the protocol; ``camera_id``/``frame_id`` are set when attributable,
    ``capture_ts`` whenever the frame carried a valid one (its error result echoes it)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        camera_id: str | None = None,
        frame_id: int | str | None = None,
        capture_ts: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.camera_id = camera_id
        self.frame_id = frame_id
        self.capture_ts = capture_ts

    @classmethod
    def for_frame(cls, header: FrameHeader, code: ErrorCode, message: str) -> ProtocolError:
        """The error of a frame whose header was valid: attributable, capture time included."""
        return cls(code, message, camera_id=header.camera_id, frame_id=header.frame_id, capture_ts=header.capture_ts)

    @property
    def attributable(self) -> bool:
        return self.camera_id is not None and self.frame_id is not None


def _dumps(values: dict[str, Any]) -> bytes:
    # allow_nan=False: NaN/Infinity are not JSON and break strict parsers on the PLC side.
    return json.dumps(values, separators=(",", ":"), allow_nan=False).encode()


def _is_number(value: object) -> TypeGuard[int | float]:
    """A finite JSON number (bools are ints in Python, and ints can be too big for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _shown(value: object) -> str:
    """``value`` for an error message that may travel back to the sender: a hostile value can be long."""
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 3] + "..."


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _nesting_exceeds(value: Any, limit: int) -> bool:
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def _loads_object(data: bytes, what: str) -> dict[str, Any]:
    """A UTF-8 JSON object; anything else (other encodings, NaN, deep nesting) is BAD_HEADER."""
    too_deep = f"{what} is nested deeper than {MAX_HEADER_DEPTH} levels"
    try:
        # Decoded here, not by json.loads(bytes), which would also accept UTF-16 and UTF-32.
        values = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError as err:
        raise ProtocolError(ErrorCode.BAD_HEADER, too_deep) from err
    except ValueError as err:  # also UnicodeDecodeError, JSONDecodeError and over-long integers
        raise ProtocolError(ErrorCode.BAD_HEADER, f"{what} is not valid UTF-8 JSON: {err}") from err
    if not isinstance(values, dict):
        raise ProtocolError(ErrorCode.BAD_HEADER, f"{what} must be a JSON object, got {type(values).__name__}")
    if _nesting_exceeds(values, MAX_HEADER_DEPTH):
        raise ProtocolError(ErrorCode.BAD_HEADER, too_deep)
    return values


def _part_bytes(part: Any) -> bytes:
    """bytes of a message part; zmq.Frame exposes ``.bytes``, everything else the buffer protocol."""
    data = getattr(part, "bytes", None)
    return data if isinstance(data, bytes) else bytes(part)


def _part_view(part: Any) -> memoryview:
    buffer = getattr(part, "buffer", None)
    return buffer if isinstance(buffer, memoryview) else memoryview(part)


def is_valid_camera_id(value: object) -> bool:
    return isinstance(value, str) and CAMERA_ID_PATTERN.match(value) is not None


def is_valid_frame_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, str) and 0 < len(value) <= MAX_FRAME_ID_CHARS


# ----------------------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class FrameHeader:
    """The JSON header of a frame message: which camera sent which frame, and how its pixels travel."""

    camera_id: str
    frame_id: int | str  # echoed in the result; a PLC InspectionID is an int
    encoding: str  # raw | jpeg | png
    capture_ts: float | None = None  # camera's capture time, seconds since the Unix epoch
    dtype: str | None = None  # raw only
    shape: tuple[int, ...] | None = None  # raw only: (H, W) or (H, W, C)
    version: int = PROTOCOL_VERSION

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "version": self.version,
            "camera_id": self.camera_id,
            "frame_id": self.frame_id,
            "encoding": self.encoding,
        }
        if self.capture_ts is not None:
            values["capture_ts"] = self.capture_ts
        if self.dtype is not None:
            values["dtype"] = self.dtype
        if self.shape is not None:
            values["shape"] = list(self.shape)
        return values

    def expected_raw_bytes(self) -> int:
        if self.shape is None or self.dtype is None:
            raise ValueError("only raw frames have a shape and dtype")
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def encode_frame(header: FrameHeader, payload: bytes | memoryview | np.ndarray) -> list[Any]:
    """Message parts for a frame. A contiguous ndarray payload is sent without a copy."""
    if isinstance(payload, np.ndarray):
        payload = np.ascontiguousarray(payload)
    return [_dumps(header.to_dict()), payload]


def raw_frame_header(
    camera_id: str, frame_id: int | str, image: np.ndarray, capture_ts: float | None = None
) -> FrameHeader:
    """The header describing ``image`` (HxW, HxWx1, HxWx3 RGB or HxWx4 RGBA; uint8 or uint16)."""
    return FrameHeader(
        camera_id=camera_id,
        frame_id=frame_id,
        encoding="raw",
        capture_ts=capture_ts,
        dtype=str(image.dtype),
        shape=tuple(int(side) for side in image.shape),
    )


def _check_raw_layout(
    values: dict[str, Any], fail: Callable[[ErrorCode, str], ProtocolError]
) -> tuple[str, tuple[int, ...]]:
    for name in ("dtype", "shape"):
        if values.get(name) is None:
            raise fail(ErrorCode.BAD_HEADER, f"a raw frame's header has no {name!r}")
    dtype = values["dtype"]
    if dtype not in RAW_DTYPES:
        raise fail(ErrorCode.BAD_DTYPE, f"raw dtype must be one of {', '.join(RAW_DTYPES)}, got {_shown(dtype)}")
    shape = values["shape"]
    valid = (
        isinstance(shape, list)
        and len(shape) in (2, 3)
        and all(isinstance(side, int) and not isinstance(side, bool) for side in shape)
        and all(0 < side <= MAX_SIDE for side in shape[:2])
        and (len(shape) == 2 or shape[2] in RAW_CHANNELS)
    )
    if not valid:
        raise fail(
            ErrorCode.BAD_SHAPE,
            f"raw shape must be [H, W] or [H, W, C] with sides 1..{MAX_SIDE} and C in {RAW_CHANNELS}, "
            f"got {_shown(shape)}",
        )
    return dtype, tuple(shape)


def decode_frame(
    parts: Sequence[Any], max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> tuple[FrameHeader, memoryview]:
    """Validate a frame message; returns the header and a zero-copy view of the payload.

    Checks run from the outside in so that the camera and frame id (and the capture time, which
    error results echo) are known and carried by the error as early as possible. A required field
    that is missing or null is BAD_HEADER; a present one with a value this daemon does not accept
    has its own code (UNKNOWN_VERSION, UNKNOWN_ENCODING, BAD_DTYPE, BAD_SHAPE).
    """
    if len(parts) == 0:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "empty message")
    header_view = _part_view(parts[0])
    if header_view.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header is {header_view.nbytes} bytes, limit {MAX_HEADER_BYTES}")
    values = _loads_object(_part_bytes(parts[0]), "frame header")

    camera_id = values.get("camera_id")
    frame_id = values.get("frame_id")
    capture_ts = values.get("capture_ts")
    known_camera = camera_id if is_valid_camera_id(camera_id) else None
    known_frame = frame_id if is_valid_frame_id(frame_id) else None
    known_capture_ts = float(capture_ts) if _is_number(capture_ts) else None

    def fail(code: ErrorCode, message: str) -> ProtocolError:
        return ProtocolError(code, message, camera_id=known_camera, frame_id=known_frame, capture_ts=known_capture_ts)

    def require(name: str) -> Any:
        if values.get(name) is None:
            raise fail(ErrorCode.BAD_HEADER, f"header has no {name!r}")
        return values[name]

    # The version first: a header of another version may lack or redefine any other field.
    version = require("version")
    # type() and not ==: 1.0 and true both equal 1 in Python, and neither is the integer 1.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise fail(
            ErrorCode.UNKNOWN_VERSION,
            f"protocol version {_shown(version)}; this daemon speaks the integer {PROTOCOL_VERSION}",
        )
    if known_camera is None:
        require("camera_id")
        raise fail(ErrorCode.BAD_HEADER, f"'camera_id' must match {CAMERA_ID_PATTERN.pattern}, got {_shown(camera_id)}")
    if known_frame is None:
        require("frame_id")
        raise fail(
            ErrorCode.BAD_HEADER,
            f"'frame_id' must be an integer >= 0 or a string of 1..{MAX_FRAME_ID_CHARS} chars, got {_shown(frame_id)}",
        )
    encoding = require("encoding")
    if encoding not in ENCODINGS:
        raise fail(
            ErrorCode.UNKNOWN_ENCODING, f"encoding must be one of {', '.join(ENCODINGS)}, got {_shown(encoding)}"
        )
    if capture_ts is not None and known_capture_ts is None:
        raise fail(ErrorCode.BAD_HEADER, f"'capture_ts' must be a number (Unix seconds), got {_shown(capture_ts)}")
    if len(parts) != 2:
        raise fail(ErrorCode.BAD_MESSAGE, f"a frame message has 2 parts [header, payload], got {len(parts)}")

    payload = _part_view(parts[1])
    if payload.nbytes > max_payload_bytes:
        raise fail(ErrorCode.TOO_LARGE, f"payload is {payload.nbytes} bytes, limit {max_payload_bytes}")
    if payload.nbytes == 0:
        raise fail(ErrorCode.BAD_MESSAGE, "payload is empty")

    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    if encoding == "raw":
        dtype, shape = _check_raw_layout(values, fail)
    header = FrameHeader(
        camera_id=known_camera,
        frame_id=known_frame,
        encoding=encoding,
        capture_ts=known_capture_ts,
        dtype=dtype,
        shape=shape,
    )
    if encoding == "raw" and payload.nbytes != header.expected_raw_bytes():
        raise fail(
            ErrorCode.BAD_SHAPE,
            f"payload is {payload.nbytes} bytes but shape {list(shape or ())} of {dtype} needs "
            f"{header.expected_raw_bytes()}",
        )
    return header, payload


def raw_payload_to_array(header: FrameHeader, payload: memoryview | bytes) -> np.ndarray:
    """The raw payload as an array of the header's dtype and shape (a view, no copy)."""
    if header.encoding != "raw" or header.dtype is None or header.shape is None:
        raise ValueError("not a raw frame")
    # Explicit little-endian: the wire format does not depend on the sender's CPU.
    dtype = np.dtype(header.dtype).newbyteorder("<")
    return np.frombuffer(payload, dtype=dtype).reshape(header.shape)


# ---------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Region:
    """The largest connected defect region, in the ORIGINAL image's pixels."""

    area_px: int
    bbox: tuple[int, int, int, int]  # x, y, width, height


@dataclass(frozen=True)
class MapInfo:
    """How the optional third result part encodes the anomaly map (the model's M x M map, which
    covers ``crop_box`` of the original image)."""

    encoding: str  # uint8 | float16
    shape: tuple[int, int]
    value_range: tuple[float, float]  # uint8: value = lo + q / 255 * (hi - lo)
    crop_box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original pixels


@dataclass(frozen=True)
class ErrorInfo:
    """Why a frame got no decision: the code a PLC can act on and a message for people."""

    code: ErrorCode
    message: str


@dataclass(frozen=True)
class ResultHeader:
    """The JSON header of a result message: the daemon's verdict on one frame (docs/protocol.md)."""

    camera_id: str
    frame_id: int | str
    decision: str | None  # "OK" | "NG"; None when ``error`` is set (treat as reject)
    score: float | None = None
    score_max: float | None = None
    threshold: float | None = None
    region: Region | None = None
    image_size: tuple[int, int] | None = None  # original H, W
    model_id: str | None = None
    model_version: str | None = None
    backend: str | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    capture_ts: float | None = None
    published_ts: float | None = None
    error: ErrorInfo | None = None
    map: MapInfo | None = None
    # Per camera, +1 for every result the daemon publishes (error results too), from 1: a gap
    # means results were lost on the way (e.g. a slow subscriber); None from older daemons.
    seq: int | None = None
    version: int = PROTOCOL_VERSION

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The header's JSON object: every field under its own name, tuples as lists, the error code by
        name and number, the map's value range as ``range``."""
        region, error, info = self.region, self.error, self.map
        return {"version": self.version} | {item.name: getattr(self, item.name) for item in fields(self)} | {
            "region": None if region is None else {"area_px": region.area_px, "bbox": list(region.bbox)},
            "image_size": None if self.image_size is None else list(self.image_size),
            "error": None if error is None else {
                "code": error.code.name, "number": int(error.code), "message": error.message},
            "map": None if info is None else {
                "encoding": info.encoding, "shape": list(info.shape), "range": list(info.value_range),
                "crop_box": list(info.crop_box)},
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ResultHeader:
        """A result header from its JSON object; BAD_HEADER names the first field that breaks v1."""

        def read(name: str, valid: Callable[[Any], bool], expected: str, required: bool = False) -> Any:
            value = values.get(name)
            if value is None and not required:
                return None
            if not valid(value):
                raise ProtocolError(
                    ErrorCode.BAD_HEADER, f"result header field {name!r} must be {expected}, got {_shown(value)}"
                )
            return value

        region = read("region", _is_region, '{"area_px": int, "bbox": [x, y, w, h]} or null')
        error = read("error", _is_error, '{"code": an error code name, "message": string} or null')
        map_info = read("map", _is_map, '{"encoding", "shape": [M, M], "range": [lo, hi], "crop_box"} or null')
        image_size = read("image_size", lambda value: _is_list_of(value, 2, _is_positive_int), "[H, W] or null")
        return cls(
            version=read("version", _is_int, "an integer", required=True),
            camera_id=read("camera_id", is_valid_camera_id, f"a camera id matching {CAMERA_ID_PATTERN.pattern}", True),
            frame_id=read("frame_id", is_valid_frame_id, "an integer >= 0 or a string", required=True),
            seq=read("seq", _is_count, "an integer >= 0 or null"),
            decision=read("decision", lambda value: value in (DECISION_OK, DECISION_NG), '"OK", "NG" or null'),
            score=read("score", _is_number, "a number or null"),
            score_max=read("score_max", _is_number, "a number or null"),
            threshold=read("threshold", _is_number, "a number or null"),
            region=None if region is None else Region(region["area_px"], tuple(region["bbox"])),
            image_size=None if image_size is None else tuple(image_size),
            model_id=read("model_id", _is_str, "a string or null"),
            model_version=read("model_version", _is_str, "a string or null"),
            backend=read("backend", _is_str, "a string or null"),
            latency_ms=read("latency_ms", _is_latencies, "an object of numbers") or {},
            capture_ts=read("capture_ts", _is_number, "a number or null"),
            published_ts=read("published_ts", _is_number, "a number or null"),
            error=None if error is None else ErrorInfo(ErrorCode[error["code"]], error["message"]),
            map=None
            if map_info is None
            else MapInfo(
                encoding=map_info["encoding"],
                shape=tuple(map_info["shape"]),
                value_range=tuple(map_info["range"]),
                crop_box=tuple(map_info["crop_box"]),
            ),
        )


# Checks of decoded JSON values. type() is int, not isinstance(): JSON true must not pass as 1.


def _is_int(value: object) -> bool:
    return type(value) is int


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _is_positive_int(value: object) -> bool:
    return type(value) is int and value > 0


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_list_of(value: object, count: int, valid_item: Callable[[Any], bool]) -> bool:
    return isinstance(value, list) and len(value) == count and all(valid_item(item) for item in value)


def _is_region(value: object) -> bool:
    return isinstance(value, dict) and _is_count(value.get("area_px")) and _is_list_of(value.get("bbox"), 4, _is_count)


def _is_error(value: object) -> bool:
    if not isinstance(value, dict):
        return False
    code = value.get("code")
    return isinstance(code, str) and code in ErrorCode.__members__ and isinstance(value.get("message"), str)


def _is_map(value: object) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("encoding"), str)
        and _is_list_of(value.get("shape"), 2, _is_positive_int)
        and _is_list_of(value.get("range"), 2, _is_number)
        and _is_list_of(value.get("crop_box"), 4, _is_number)
    )


def _is_latencies(value: object) -> bool:
    return isinstance(value, dict) and all(_is_number(seconds) for seconds in value.values())


def result_topic(camera_id: str) -> bytes:
    """PUB topic of one camera's results. ZeroMQ subscriptions match prefixes, so subscribing to
    ``result/cam1`` also delivers ``result/cam10``: filter on the header's camera_id when exact."""
    return RESULT_TOPIC_PREFIX + camera_id.encode()


def result_topic_camera(parts: Sequence[Any]) -> str | None:
    """The camera a published message's topic names (``result/<camera>``), or None: the inverse of
    :func:`result_topic`, readable even where the rest of the message is not."""
    if not parts or not isinstance(parts[0], bytes) or not parts[0].startswith(RESULT_TOPIC_PREFIX):
        return None
    return parts[0][len(RESULT_TOPIC_PREFIX) :].decode("utf-8", "replace")


def subscription_topics(camera_ids: Sequence[str] = ()) -> list[bytes]:
    """What a results subscriber subscribes to: the results of ``camera_ids`` (every camera's when
    empty) and the heartbeats, which prove the subscription live while no part passes."""
    results = [result_topic(camera_id) for camera_id in camera_ids] if camera_ids else [RESULT_TOPIC_PREFIX]
    return [*results, HEARTBEAT_TOPIC]


def encode_map(
    anomaly_map: np.ndarray, encoding: str, crop_box: tuple[float, float, float, float]
) -> tuple[MapInfo, bytes]:
    """Quantise an M x M map for the wire: uint8 scaled to its own min..max, or float16."""
    if encoding not in MAP_ENCODINGS:
        raise ValueError(f"map encoding must be one of {', '.join(MAP_ENCODINGS)}, got {encoding!r}")
    shape = (int(anomaly_map.shape[-2]), int(anomaly_map.shape[-1]))
    values = np.asarray(anomaly_map, dtype=np.float32).reshape(shape)
    lo, hi = float(values.min()), float(values.max())
    if encoding == "float16":
        payload = values.astype("<f2").tobytes()
    else:
        span = hi - lo if hi > lo else 1.0
        payload = np.clip(np.rint((values - lo) / span * 255.0), 0, 255).astype(np.uint8).tobytes()
    return MapInfo(encoding=encoding, shape=shape, value_range=(lo, hi), crop_box=crop_box), payload


def decode_map(info: MapInfo, payload: bytes | memoryview) -> np.ndarray:
    """The float32 M x M map back from a result's third part."""
    expected = info.shape[0] * info.shape[1] * (2 if info.encoding == "float16" else 1)
    if len(payload) != expected:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"map payload is {len(payload)} bytes, expected {expected}")
    if info.encoding == "float16":
        return np.frombuffer(payload, dtype="<f2").astype(np.float32).reshape(info.shape)
    if info.encoding == "uint8":
        lo, hi = info.value_range
        span = hi - lo if hi > lo else 1.0
        quantised = np.frombuffer(payload, dtype=np.uint8).astype(np.float32).reshape(info.shape)
        return lo + quantised / 255.0 * span
    raise ProtocolError(ErrorCode.UNKNOWN_ENCODING, f"unknown map encoding {info.encoding!r}")


def encode_result(header: ResultHeader, map_payload: bytes | None = None) -> list[bytes]:
    if (map_payload is None) != (header.map is None):
        raise ValueError("a map payload needs header.map and header.map needs a payload")
    parts = [result_topic(header.camera_id), _dumps(header.to_dict())]
    if map_payload is not None:
        parts.append(map_payload)
    return parts


def decode_result(parts: Sequence[Any]) -> tuple[ResultHeader, np.ndarray | None]:
    if len(parts) not in (2, 3) or not _part_bytes(parts[0]).startswith(RESULT_TOPIC_PREFIX):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a result message is [result/<camera>, header, map?]")
    header = ResultHeader.from_dict(_loads_object(_part_bytes(parts[1]), "result header"))
    if header.version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.UNKNOWN_VERSION, f"result version {header.version!r}")
    anomaly_map = None
    if len(parts) == 3:
        if header.map is None:
            raise ProtocolError(ErrorCode.BAD_HEADER, "map payload present but header.map is null")
        anomaly_map = decode_map(header.map, _part_bytes(parts[2]))
    return header, anomaly_map


# ------------------------------------------------------------------------------------- heartbeats


@dataclass(frozen=True)
class Heartbeat:
    """Sent on the results socket every heartbeat interval; silence means the daemon is gone."""

    ts: float  # Unix seconds
    seq: int  # increments by one per heartbeat; a gap means heartbeats were lost
    state: str  # starting | serving | stopping
    ready: bool  # a model is loaded and frames are being processed
    model_id: str | None = None
    model_version: str | None = None
    backend: str | None = None
    uptime_s: float = 0.0
    frames: int = 0  # frames inspected since start
    errors: int = 0
    drops: int = 0
    queue_depth: int = 0
    version: int = PROTOCOL_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"type": "heartbeat", **{name: getattr(self, name) for name in self.__dataclass_fields__}}


def encode_heartbeat(heartbeat: Heartbeat) -> list[bytes]:
    return [HEARTBEAT_TOPIC, _dumps(heartbeat.to_dict())]


def decode_heartbeat(parts: Sequence[Any]) -> Heartbeat:
    if len(parts) != 2 or _part_bytes(parts[0]) != HEARTBEAT_TOPIC:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a heartbeat message is [hb, header]")
    values = _loads_object(_part_bytes(parts[1]), "heartbeat")
    # Fields this version does not know are ignored: v1 may gain optional fields.
    known = {name: value for name, value in values.items() if name in Heartbeat.__dataclass_fields__}
    try:
        heartbeat = Heartbeat(**known)
    except TypeError as err:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"heartbeat does not match protocol v1: {err}") from err
    if heartbeat.version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.UNKNOWN_VERSION, f"heartbeat version {heartbeat.version!r}")
    return heartbeat


def decode_published(parts: Sequence[Any]) -> Heartbeat | tuple[ResultHeader, np.ndarray | None]:
    """Anything read from the results socket: a Heartbeat or (ResultHeader, map or None)."""
    if len(parts) >= 1 and _part_bytes(parts[0]) == HEARTBEAT_TOPIC:
        return decode_heartbeat(parts)
    return decode_result(parts)
