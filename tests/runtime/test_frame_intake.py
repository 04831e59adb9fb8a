"""Hostile frames against the daemon's intake: image sizes read from file headers before decoding,
payloads checked against their encoding label, every header failure classified, accurate decode
messages, and error results of one documented shape.

Where the daemon's answer is the point, the frames travel over real ZeroMQ sockets to a running
daemon and the answers are read as the raw JSON a PLC-side client would parse.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import zmq
from runtime_harness import Client, encoded, flat_frame, frame_parts, running_daemon, square_frame

from llb_edge.data.images import ImageReadError, decode_image_bytes
from llb_edge.protocol import MAX_HEADER_DEPTH, ErrorCode, FrameHeader, ProtocolError, decode_frame
from llb_edge.runtime.frames import decode_frame_image
from llb_edge.runtime.image_header import ImageHeaderError, read_image_header

pytest_plugins = ["runtime_fixtures"]  # contract-test-model bundles
pytestmark = pytest.mark.timeout(60)

CAPTURE_TS = 1_700_000_000.5
# What an error result carries in place of inspection values (docs/protocol.md, "Error results").
ERROR_RESULT_EMPTY = {
    "decision": None,
    "score": None,
    "score_max": None,
    "threshold": None,
    "region": None,
    "image_size": None,
    "latency_ms": {},
    "map": None,
}


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bilevel_png(side: int) -> bytes:
    """A black 1-bit grey PNG of side x side: a few KB on the wire, side * side bytes once decoded."""
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose pixel data is garbage."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"not zlib at all")


def png_of(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def bmp_of(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".bmp", rgb)
    assert ok
    return data.tobytes()


def header(frame_id: int | str, **fields: Any) -> bytes:
    """A frame header of camera "hostile" with a capture time; ``None`` removes a field."""
    values = {"version": 1, "camera_id": "hostile", "frame_id": frame_id, "capture_ts": CAPTURE_TS}
    values.update(fields)
    return json.dumps({key: value for key, value in values.items() if value is not None}).encode()


def raw_results(client: Client, count: int, timeout_s: float = 10.0) -> dict[Any, dict[str, Any]]:
    """The next ``count`` result headers as parsed JSON, by frame id (heartbeats skipped)."""
    found: dict[Any, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(found) < count and time.monotonic() < deadline:
        try:
            parts = client.sub.recv_multipart()
        except zmq.Again:
            continue
        if parts[0].startswith(b"result/"):
            body = json.loads(parts[1])
            found[body["frame_id"]] = body
    assert len(found) == count, f"expected {count} results, got {sorted(found, key=str)} within {timeout_s} s"
    return found


def error_of(result: dict[str, Any]) -> tuple[str, str]:
    assert result["error"] is not None, result
    return result["error"]["code"], result["error"]["message"]


def errors_by_code(daemon: Any) -> dict[str, int]:
    return {key[0]: int(value) for key, value in daemon.metrics.errors.items().items()}


# ------------------------------------------------------------------------------- header reader


@pytest.mark.parametrize(
    ("image", "extension", "flags"),
    [
        (np.zeros((30, 40), np.uint8), ".png", []),
        (np.zeros((30, 40, 3), np.uint8), ".png", []),
        (np.zeros((30, 40, 4), np.uint16), ".png", []),
        (np.zeros((30, 40), np.uint16), ".png", []),
        (np.zeros((30, 40, 3), np.uint8), ".jpg", []),
        (np.zeros((30, 40, 3), np.uint8), ".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        (np.zeros((30, 40), np.uint8), ".jpg", []),
    ],
    ids=["png-gray8", "png-rgb8", "png-rgba16", "png-gray16", "jpeg", "jpeg-progressive", "jpeg-gray"],
)
def test_header_reader_bounds_what_the_decoder_allocates(image: np.ndarray, extension: str, flags: list[int]) -> None:
    ok, data = cv2.imencode(extension, image, flags)
    assert ok
    info = read_image_header(data.tobytes(), "png" if extension == ".png" else "jpeg")
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    assert (info.height, info.width) == decoded.shape[:2] == (30, 40)
    assert info.decoded_bytes >= decoded.nbytes
    assert info.sample_bytes == decoded.dtype.itemsize


JPEG = encoded(square_frame(40, 40, (5, 5, 10, 10)), "jpeg")
PNG = encoded(square_frame(40, 40, (5, 5, 10, 10)), "png")

# (payload, label, what the refusal must say)
MALFORMED_HEADERS = {
    "png labelled jpeg": (PNG, "jpeg", "payload labelled jpeg is a PNG file"),
    "jpeg labelled png": (JPEG, "png", "payload labelled png is a JPEG file"),
    "bmp labelled png": (bmp_of(flat_frame(4, 4)), "png", "payload labelled png is a BMP file"),
    "text labelled jpeg": (b"hello world", "jpeg", "not an image file I know (it starts with 68 65 6c"),
    "png cut in IHDR": (PNG[:20], "png", "truncated PNG: 20 bytes end inside its IHDR header"),
    "png without IHDR": (PNG[:8] + png_chunk(b"IEND", b"") + PNG[8:], "png", "the first chunk is b'IEND' of 0"),
    "png of width 0": (png_claiming(0, 5), "png", "IHDR gives a size of 0x5"),
    "png of bad depth": (PNG[:24] + b"\x03" + PNG[25:], "png", "colour type 2 with bit depth 3"),
    "jpeg cut before a marker": (b"\xff\xd8", "jpeg", "truncated JPEG: 2 bytes end before its frame header"),
    "jpeg 7 bytes ending in EOI": (
        b"\xff\xd8\x00\x00\x00\xff\xd9",
        "jpeg",
        "corrupt JPEG: byte 2 is 0x00 where a marker should start",
    ),
    "jpeg with only EOI": (b"\xff\xd8\xff\xd9", "jpeg", "end-of-image marker at byte 2, before its frame header"),
    "jpeg cut in a segment": (JPEG[:30], "jpeg", "claims"),
    "jpeg scan before frame": (b"\xff\xd8\xff\xda\x00\x02\xff\xd9", "jpeg", "a scan starts before any frame header"),
    "jpeg segment length 0": (b"\xff\xd8\xff\xe0\x00\x00\xff\xd9", "jpeg", "claims 0 bytes"),
    "jpeg of height 0": (b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x00\x00\x10\x01\x01\x11\x00", "jpeg", "size of 16x0"),
}


@pytest.mark.parametrize("name", list(MALFORMED_HEADERS))
def test_header_reader_refuses_malformed_files_with_the_reason(name: str) -> None:
    payload, label, reason = MALFORMED_HEADERS[name]
    with pytest.raises(ImageHeaderError) as caught:
        read_image_header(payload, label)
    assert reason in caught.value.reason


def test_pixel_buffer_bytes_are_bounded_not_only_pixels() -> None:
    def decode(parts: list[Any], max_pixels: int) -> np.ndarray:
        frame_header, payload = decode_frame(parts)
        return decode_frame_image(frame_header, payload, max_pixels=max_pixels)

    rgba8, rgba16 = np.zeros((50, 40, 4), np.uint8), np.zeros((50, 40, 4), np.uint16)
    limit = 50 * 40  # pixels: both images are within it, only the 16-bit one is over 4 bytes a pixel
    for encoding, (parts8, parts16) in {
        "png": ([header(1, encoding="png"), png_of(rgba8)], [header(2, encoding="png"), png_of(rgba16)]),
        "raw": (frame_parts("hostile", 1, rgba8), frame_parts("hostile", 2, rgba16)),
    }.items():
        assert decode(parts8, limit).shape == (50, 40, 3), encoding
        with pytest.raises(ProtocolError) as caught:
            decode(parts16, limit)
        assert caught.value.code is ErrorCode.TOO_LARGE and "16000 bytes as pixels" in caught.value.message


# ------------------------------------------------------------------------------- the daemon


def test_oversized_images_are_refused_from_their_header_before_decoding(bundle_dir: Path) -> None:
    """Issue 13 item 10: a 32 KB PNG that decodes to 268 MB is refused without being decoded."""
    bomb = bilevel_png(16384)
    assert len(bomb) < 64_000
    with running_daemon(bundle_dir) as daemon, Client.of(daemon) as client:
        sent = time.monotonic()
        client.send([header("bomb", encoding="png"), bomb])
        result = raw_results(client, 1)["bomb"]
        # Decoding takes 268 MB and seconds; reading the header takes microseconds.
        assert time.monotonic() - sent < 2.0
        assert error_of(result) == ("TOO_LARGE", "16384x16384 is over 64000000 pixels")
        assert result["capture_ts"] == CAPTURE_TS

        # The decoder never sees it: garbage pixel data behind a huge header is TOO_LARGE, not
        # DECODE_FAILED, and a sane header with the same garbage is DECODE_FAILED.
        client.send([header("garbage-huge", encoding="png"), png_claiming(20000, 20000)])
        client.send([header("garbage-small", encoding="png"), png_claiming(20, 20)])
        results = raw_results(client, 2)
        assert error_of(results["garbage-huge"])[0] == "TOO_LARGE"
        assert error_of(results["garbage-small"])[0] == "DECODE_FAILED"

        client.send_frame("cam-a", "after", flat_frame(32, 32), "png")
        assert raw_results(client, 1)["after"]["decision"] == "OK"
        assert errors_by_code(daemon) == {"TOO_LARGE": 2, "DECODE_FAILED": 1}


def test_sixteen_bit_and_rgba_frames_are_bounded_by_bytes(bundle_dir: Path) -> None:
    rgba8, rgba16 = np.zeros((80, 80, 4), np.uint8), np.zeros((80, 80, 4), np.uint16)
    with running_daemon(bundle_dir, max_pixels=10_000) as daemon, Client.of(daemon) as client:
        client.send([header("png8", encoding="png"), png_of(rgba8)])
        client.send([header("png16", encoding="png"), png_of(rgba16)])
        client.send(frame_parts("hostile", "raw8", rgba8))
        client.send(frame_parts("hostile", "raw16", rgba16))
        results = raw_results(client, 4)
    assert results["png8"]["error"] is None and results["raw8"]["error"] is None
    for frame_id in ("png16", "raw16"):
        code, message = error_of(results[frame_id])
        assert code == "TOO_LARGE" and "51200 bytes as pixels, over 40000" in message


def test_unparseable_headers_are_bad_header_never_internal(bundle_dir: Path) -> None:
    """Issue 13 item 12: deep nesting raised RecursionError and was counted INTERNAL."""
    deep = b'{"version":1,"camera_id":"hostile","frame_id":1,"x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    nested = {"version": 1, "camera_id": "hostile", "frame_id": 2, "encoding": "png"}
    value: Any = 0
    for _ in range(MAX_HEADER_DEPTH):
        value = [value]
    nested["x"] = value  # parseable, one level deeper than the limit
    hostile = [
        deep,
        json.dumps(nested).encode(),
        b'{"version":1,"camera_id":"hostile","frame_id":3,"encoding":"png","capture_ts":NaN}',
        b'{"version":1,"camera_id":"hostile","frame_id":4,"encoding":"png","capture_ts":-Infinity}',
        b'{"version":1,"camera_id":"hostile","frame_id":5,"n":' + b"9" * 5000 + b"}",  # over Python's int limit
        json.dumps({"version": 1, "camera_id": "hostile", "frame_id": 6}).encode("utf-16"),
        b'{"version":1,"camera_id":"hostile\xff","frame_id":7}',
        b"\xef\xbb\xbf" + header(8, encoding="png"),  # UTF-8 byte order mark
    ]
    assert all(len(part) < 16 * 1024 for part in hostile)
    with running_daemon(bundle_dir) as daemon, Client.of(daemon) as client:
        for part in hostile:
            client.send([part, PNG])
        client.send_frame("cam-a", "after", flat_frame(32, 32))
        results = raw_results(client, 1)
        assert results["after"]["decision"] == "OK"  # nothing attributable was answered before it
        assert errors_by_code(daemon) == {"BAD_HEADER": len(hostile)}


def test_encoding_labels_and_version_type_are_checked(bundle_dir: Path) -> None:
    """Issue 13 item 15: payloads must be files of their label's format; version must be the integer 1."""
    bmp = bmp_of(flat_frame(32, 32))
    with running_daemon(bundle_dir) as daemon, Client.of(daemon) as client:
        client.send([header("png-as-jpeg", encoding="jpeg"), PNG])
        client.send([header("jpeg-as-png", encoding="png"), JPEG])
        client.send([header("bmp-as-png", encoding="png"), bmp])
        client.send([header("bmp-as-jpeg", encoding="jpeg"), bmp])
        for version in (1.0, True, "1"):
            client.send([header(f"version-{version!r}", encoding="png", version=version), PNG])
        client.send([header("jpeg", encoding="jpeg"), JPEG])
        results = raw_results(client, 8)
        assert daemon.metrics.errors.value(code="INTERNAL") == 0
    assert error_of(results["png-as-jpeg"]) == ("DECODE_FAILED", "payload labelled jpeg is a PNG file")
    assert error_of(results["jpeg-as-png"]) == ("DECODE_FAILED", "payload labelled png is a JPEG file")
    assert error_of(results["bmp-as-png"]) == ("DECODE_FAILED", "payload labelled png is a BMP file")
    assert error_of(results["bmp-as-jpeg"]) == ("DECODE_FAILED", "payload labelled jpeg is a BMP file")
    for version in (1.0, True, "1"):
        code, message = error_of(results[f"version-{version!r}"])
        assert code == "UNKNOWN_VERSION" and "speaks the integer 1" in message
    assert results["jpeg"]["decision"] == "NG"


def test_error_results_have_one_documented_shape(bundle_dir: Path) -> None:
    """Issue 13 item 16: missing fields are BAD_HEADER; every error result carries every field,
    the documented empty values, and the frame's capture_ts."""
    pixels = bytes(8 * 8 * 3)
    raw = {"encoding": "raw", "dtype": "uint8", "shape": [8, 8, 3]}
    frames = {
        "no-encoding": ([header("no-encoding"), pixels], "BAD_HEADER"),
        "null-encoding": ([header("null-encoding", encoding=None), pixels], "BAD_HEADER"),
        "no-dtype": ([header("no-dtype", **{**raw, "dtype": None}), pixels], "BAD_HEADER"),
        "no-shape": ([header("no-shape", **{**raw, "shape": None}), pixels], "BAD_HEADER"),
        "bad-capture-ts": ([header("bad-capture-ts", capture_ts="noon", **raw), pixels], "BAD_HEADER"),
        "version-2": ([header("version-2", version=2), pixels], "UNKNOWN_VERSION"),
        "encoding-tiff": ([header("encoding-tiff", encoding="tiff"), pixels], "UNKNOWN_ENCODING"),
        "dtype-float": ([header("dtype-float", **{**raw, "dtype": "float32"}), pixels], "BAD_DTYPE"),
        "shape-mismatch": ([header("shape-mismatch", **{**raw, "shape": [8, 9, 3]}), pixels], "BAD_SHAPE"),
        "three-parts": ([header("three-parts", **raw), pixels, pixels], "BAD_MESSAGE"),
        "empty-payload": ([header("empty-payload", **raw), b""], "BAD_MESSAGE"),
        "too-large": ([header("too-large", **raw), bytes(3000)], "TOO_LARGE"),
        "decode-failed": ([header("decode-failed", encoding="jpeg"), b"\xff\xd8\xff\xd9"], "DECODE_FAILED"),
        "second-camera": ([header("second-camera", camera_id="other", **raw), pixels], "TOO_MANY_CAMERAS"),
    }
    with running_daemon(bundle_dir, max_payload_bytes=2000, max_cameras=1) as daemon, Client.of(daemon) as client:
        client.send([header("ok", **raw), pixels])  # takes the one camera slot
        ok = raw_results(client, 1)["ok"]
        for parts, _code in frames.values():
            client.send(parts)
        results = raw_results(client, len(frames))
    assert ok["error"] is None and ok["capture_ts"] == CAPTURE_TS
    for frame_id, (_, code) in frames.items():
        result = results[frame_id]
        assert error_of(result)[0] == code, (frame_id, result["error"])
        assert result.keys() == ok.keys(), frame_id
        # Echoed whenever the frame carried a valid one, whatever went wrong after.
        assert result["capture_ts"] == (None if frame_id == "bad-capture-ts" else CAPTURE_TS), frame_id
        for field in ("model_id", "model_version", "backend"):
            assert result[field] == ok[field], (frame_id, field)
        for field, empty in ERROR_RESULT_EMPTY.items():
            assert result[field] == empty, (frame_id, field)
        assert isinstance(result["published_ts"], float)
    assert error_of(results["no-shape"])[1] == "a raw frame's header has no 'shape'"


def test_decode_failures_say_what_is_wrong(bundle_dir: Path) -> None:
    """Issue 13 item 17: a 7-byte payload ending in FFD9 was reported as missing its end marker."""
    jpeg = encoded(square_frame(64, 64, (5, 5, 30, 30)), "jpeg")
    scan = jpeg.rfind(b"\xff\xda")
    payloads = {
        "seven-bytes": (b"\xff\xd8\x00\x00\x00\xff\xd9", "corrupt JPEG: byte 2 is 0x00 where a marker should start"),
        "only-markers": (
            b"\xff\xd8\xff\xd9",
            "corrupt JPEG: end-of-image marker at byte 2, before its frame header (SOFn marker)",
        ),
        "cut-in-scan": (jpeg[: scan + 40], "truncated JPEG (no end-of-image marker after the last scan)"),
        "cut-in-headers": (
            jpeg[:scan],
            f"truncated JPEG: {scan} bytes end before its first scan (start-of-scan marker)",
        ),
    }
    with running_daemon(bundle_dir) as daemon, Client.of(daemon) as client:
        for frame_id, (payload, _) in payloads.items():
            client.send([header(frame_id, encoding="jpeg"), payload])
        results = raw_results(client, len(payloads))
    for frame_id, (_, message) in payloads.items():
        assert error_of(results[frame_id]) == ("DECODE_FAILED", message), frame_id


def test_a_jpeg_without_a_scan_is_not_called_truncated_at_its_end() -> None:
    jpeg = encoded(square_frame(16, 16, (2, 2, 4, 4)), "jpeg")
    no_scan = jpeg[: jpeg.rfind(b"\xff\xda")] + b"\xff\xd9"
    frame_header = FrameHeader(camera_id="cam", frame_id=1, encoding="jpeg")
    with pytest.raises(ProtocolError) as caught:
        decode_frame_image(frame_header, memoryview(no_scan))
    assert caught.value.message.endswith("before its first scan (start-of-scan marker)")
    # Training images go through the same decode; it names the missing marker too.
    with pytest.raises(ImageReadError, match="no start-of-scan marker"):
        decode_image_bytes(no_scan)
