"""Wire protocol v1: round trips of every message type and every frame error code."""

from __future__ import annotations

import json

import numpy as np
import pytest
from runtime_harness import encoded, header_bytes, square_frame

from llb_edge.protocol import (
    HEARTBEAT_TOPIC,
    PROTOCOL_VERSION,
    ErrorCode,
    ErrorInfo,
    FrameHeader,
    Heartbeat,
    MapInfo,
    ProtocolError,
    Region,
    ResultHeader,
    decode_frame,
    decode_heartbeat,
    decode_map,
    decode_published,
    decode_result,
    encode_frame,
    encode_heartbeat,
    encode_map,
    encode_result,
    raw_frame_header,
    raw_payload_to_array,
    result_topic,
    result_topic_camera,
    subscription_topics,
)
from llb_edge.runtime.frames import decode_frame_image, raw_to_rgb8


def _valid_header(**overrides: object) -> dict:
    values = {"version": 1, "camera_id": "cam1", "frame_id": 7, "encoding": "raw", "dtype": "uint8", "shape": [4, 6, 3]}
    values.update(overrides)
    return {key: value for key, value in values.items() if value is not None}


@pytest.mark.parametrize(
    "image",
    [
        np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3),
        np.arange(4 * 6, dtype=np.uint8).reshape(4, 6),
        np.arange(4 * 6 * 4, dtype=np.uint16).reshape(4, 6, 4) * 500,
    ],
    ids=["rgb8", "gray8", "rgba16"],
)
def test_raw_frame_round_trip(image: np.ndarray) -> None:
    header = raw_frame_header("cam1", 42, image, capture_ts=1700000000.25)
    parts = encode_frame(header, image)
    decoded, payload = decode_frame([bytes(parts[0]), bytes(np.ascontiguousarray(parts[1]))])
    assert decoded == header
    assert np.array_equal(raw_payload_to_array(decoded, payload), image)
    rgb = raw_to_rgb8(raw_payload_to_array(decoded, payload))
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8


def test_encoded_frame_round_trip_and_decode() -> None:
    rgb = square_frame(40, 50, (10, 10, 8, 8))
    header = FrameHeader(camera_id="line-2.cam:a", frame_id="part-0001", encoding="png")
    decoded, payload = decode_frame(encode_frame(header, encoded(rgb, "png")))
    assert decoded == header
    assert np.array_equal(decode_frame_image(decoded, payload), rgb)


def test_result_round_trip_with_maps() -> None:
    anomaly_map = np.linspace(0, 0.5, 16 * 16, dtype=np.float32).reshape(1, 16, 16)
    for encoding, tolerance in (("float16", 1e-3), ("uint8", 0.5 / 255)):
        info, payload = encode_map(anomaly_map, encoding, (1.0, 2.0, 30.0, 40.0))
        header = ResultHeader(
            camera_id="cam1",
            frame_id=3,
            decision="NG",
            score=0.5,
            score_max=0.5,
            threshold=0.1,
            region=Region(area_px=120, bbox=(1, 2, 10, 12)),
            image_size=(48, 64),
            model_id="m",
            model_version="2",
            backend="ort-cpu",
            latency_ms={"total": 1.5},
            capture_ts=1.0,
            published_ts=2.0,
            map=info,
        )
        parts = encode_result(header, payload)
        assert parts[0] == result_topic("cam1") == b"result/cam1"
        decoded, decoded_map = decode_result(parts)
        assert decoded == header
        assert decoded_map is not None and np.allclose(decoded_map, anomaly_map[0], atol=tolerance)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_result_round_trip_for_every_code(code: ErrorCode) -> None:
    header = ResultHeader(camera_id="cam1", frame_id=9, decision=None, error=ErrorInfo(code, "why"))
    parts = encode_result(header)
    body = json.loads(parts[1])
    assert body["error"] == {"code": code.name, "number": int(code), "message": "why"}
    decoded, anomaly_map = decode_result(parts)
    assert decoded == header and not decoded.ok and anomaly_map is None


def test_topics_name_the_camera_and_subscriptions_cover_heartbeats() -> None:
    assert result_topic_camera([result_topic("cam-é"), b"{not json"]) == "cam-é"
    for unnamed in ([], [HEARTBEAT_TOPIC, b"{}"], ["result/cam1"], [b"other/cam1"]):
        assert result_topic_camera(unnamed) is None
    assert subscription_topics() == [b"result/", HEARTBEAT_TOPIC]
    assert subscription_topics(["cam1", "cam2"]) == [b"result/cam1", b"result/cam2", HEARTBEAT_TOPIC]


def test_heartbeat_round_trip() -> None:
    heartbeat = Heartbeat(ts=5.0, seq=3, state="serving", ready=True, model_id="m", frames=10, queue_depth=2)
    parts = encode_heartbeat(heartbeat)
    assert parts[0] == HEARTBEAT_TOPIC
    assert decode_heartbeat(parts) == heartbeat
    assert decode_published(parts) == heartbeat
    newer = json.loads(parts[1]) | {"field_from_the_future": 1}
    assert decode_heartbeat([HEARTBEAT_TOPIC, json.dumps(newer).encode()]) == heartbeat


def test_results_never_carry_nan() -> None:
    header = ResultHeader(camera_id="cam1", frame_id=1, decision="OK", score=float("nan"))
    with pytest.raises(ValueError):
        encode_result(header)


def test_map_payload_size_is_checked() -> None:
    info = MapInfo(encoding="uint8", shape=(4, 4), value_range=(0.0, 1.0), crop_box=(0, 0, 4, 4))
    with pytest.raises(ProtocolError) as caught:
        decode_map(info, b"\x00" * 15)
    assert caught.value.code is ErrorCode.BAD_SHAPE


PAYLOAD = bytes(4 * 6 * 3)

# (parts, expected code, attributable): every way the decoder can refuse a frame.
MALFORMED = {
    "empty message": ([], ErrorCode.BAD_MESSAGE, False),
    "header not json": ([b"\xff\x00garbage", PAYLOAD], ErrorCode.BAD_HEADER, False),
    "header not an object": ([b"[1, 2]", PAYLOAD], ErrorCode.BAD_HEADER, False),
    "header too big": ([b" " * 20000, PAYLOAD], ErrorCode.BAD_HEADER, False),
    "no version": ([header_bytes(**_valid_header(version=None)), PAYLOAD], ErrorCode.BAD_HEADER, True),
    "null version": ([b'{"version":null,"camera_id":"cam1","frame_id":7}', PAYLOAD], ErrorCode.BAD_HEADER, True),
    "no encoding": ([header_bytes(**_valid_header(encoding=None)), PAYLOAD], ErrorCode.BAD_HEADER, True),
    "no dtype": ([header_bytes(**_valid_header(dtype=None)), PAYLOAD], ErrorCode.BAD_HEADER, True),
    "no shape": ([header_bytes(**_valid_header(shape=None)), PAYLOAD], ErrorCode.BAD_HEADER, True),
    "NaN": ([header_bytes(**_valid_header()).replace(b"7", b"NaN"), PAYLOAD], ErrorCode.BAD_HEADER, False),
    "utf-16": ([json.dumps(_valid_header()).encode("utf-16"), PAYLOAD], ErrorCode.BAD_HEADER, False),
    "deep": ([b'{"x":' + b"[" * 3000 + b"]" * 3000 + b"}", PAYLOAD], ErrorCode.BAD_HEADER, False),
    "bad camera id": ([header_bytes(**_valid_header(camera_id="../etc")), PAYLOAD], ErrorCode.BAD_HEADER, False),
    "negative frame id": ([header_bytes(**_valid_header(frame_id=-1)), PAYLOAD], ErrorCode.BAD_HEADER, False),
    "bool frame id": ([header_bytes(**_valid_header(frame_id=True)), PAYLOAD], ErrorCode.BAD_HEADER, False),
    "bad capture_ts": ([header_bytes(**_valid_header(capture_ts="noon")), PAYLOAD], ErrorCode.BAD_HEADER, True),
    "version 2": ([header_bytes(**_valid_header(version=2)), PAYLOAD], ErrorCode.UNKNOWN_VERSION, True),
    "version 1.0": ([header_bytes(**_valid_header(version=1.0)), PAYLOAD], ErrorCode.UNKNOWN_VERSION, True),
    "version true": ([header_bytes(**_valid_header(version=True)), PAYLOAD], ErrorCode.UNKNOWN_VERSION, True),
    "encoding bmp": ([header_bytes(**_valid_header(encoding="bmp")), PAYLOAD], ErrorCode.UNKNOWN_ENCODING, True),
    "header only": ([header_bytes(**_valid_header())], ErrorCode.BAD_MESSAGE, True),
    "three parts": ([header_bytes(**_valid_header()), PAYLOAD, b"x"], ErrorCode.BAD_MESSAGE, True),
    "empty payload": ([header_bytes(**_valid_header()), b""], ErrorCode.BAD_MESSAGE, True),
    "too large": ([header_bytes(**_valid_header()), bytes(1001)], ErrorCode.TOO_LARGE, True),
    "float dtype": ([header_bytes(**_valid_header(dtype="float32")), PAYLOAD], ErrorCode.BAD_DTYPE, True),
    "two channels": ([header_bytes(**_valid_header(shape=[4, 6, 2])), PAYLOAD], ErrorCode.BAD_SHAPE, True),
    "side too big": ([header_bytes(**_valid_header(shape=[4, 100000, 3])), PAYLOAD], ErrorCode.BAD_SHAPE, True),
    "size mismatch": ([header_bytes(**_valid_header(shape=[4, 5, 3])), PAYLOAD], ErrorCode.BAD_SHAPE, True),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_decode_frame_refuses_malformed(name: str) -> None:
    parts, code, attributable = MALFORMED[name]
    with pytest.raises(ProtocolError) as caught:
        decode_frame(parts, max_payload_bytes=1000)
    assert caught.value.code is code, caught.value
    assert caught.value.attributable is attributable
    if attributable:
        assert (caught.value.camera_id, caught.value.frame_id) == ("cam1", 7)


def test_frame_errors_carry_the_capture_time_and_short_values() -> None:
    parts = [header_bytes(**_valid_header(version="x" * 1000, capture_ts=12.5)), PAYLOAD]
    with pytest.raises(ProtocolError) as caught:
        decode_frame(parts)
    assert caught.value.code is ErrorCode.UNKNOWN_VERSION and caught.value.capture_ts == 12.5
    assert len(caught.value.message) < 200  # a hostile value is not echoed in full


def test_result_decoder_names_the_field_that_breaks_the_protocol() -> None:
    header = ResultHeader(camera_id="cam1", frame_id=9, decision="OK", score=0.5, region=Region(4, (1, 2, 2, 2)))
    body = json.loads(encode_result(header)[1])
    for field, value in [
        ("region", {"area_px": 1e400, "bbox": [1, 2, 3, 4]}),
        ("score", "0.5"),
        ("decision", 1),
        ("error", {"code": ["BAD_HEADER"], "message": "x"}),
        ("latency_ms", [[1, 2]]),
        ("map", {"encoding": "uint8", "shape": [2.0, 3.0], "range": [0, 1], "crop_box": [0, 0, 1, 1]}),
        ("frame_id", -1),
    ]:
        broken = json.dumps({**body, field: value}).replace("Infinity", "1e400").encode()
        with pytest.raises(ProtocolError) as caught:
            decode_result([result_topic("cam1"), broken])
        assert caught.value.code is ErrorCode.BAD_HEADER and repr(field) in caught.value.message


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xd8\xff\xe0 not really a jpeg", encoded(square_frame(32, 32, (4, 4, 8, 8)), "jpeg")[:-300]],
    ids=["garbage", "truncated"],
)
def test_undecodable_jpeg_is_decode_failed(payload: bytes) -> None:
    header, view = decode_frame(
        [header_bytes(version=PROTOCOL_VERSION, camera_id="cam1", frame_id=7, encoding="jpeg"), payload]
    )
    with pytest.raises(ProtocolError) as caught:
        decode_frame_image(header, view)
    assert caught.value.code is ErrorCode.DECODE_FAILED and caught.value.attributable


def test_decoded_image_over_pixel_limit_is_too_large() -> None:
    header, view = decode_frame(
        [
            header_bytes(version=1, camera_id="cam1", frame_id=7, encoding="png"),
            encoded(square_frame(50, 50, (0, 0, 1, 1)), "png"),
        ]
    )
    with pytest.raises(ProtocolError) as caught:
        decode_frame_image(header, view, max_pixels=2000)
    assert caught.value.code is ErrorCode.TOO_LARGE
