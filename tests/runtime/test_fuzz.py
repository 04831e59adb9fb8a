"""Fuzzing the parsers that read what other programs wrote: frames (camera -> daemon), results and
heartbeats (daemon -> consumers), and bundle manifests.

Inputs start from valid messages and real image files and are mutated field by field and byte by
byte, plus plain random bytes. The parsers may only refuse with their documented error types
(ProtocolError with a frame error code, BundleError), never crash with anything else. Examples
are derandomized so a failure reproduces, and bounded: the three tests take about 25 s of CPU
(a minute or so of wall time on a busy 2-core machine).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_harness import encoded, make_bundle, square_frame

from llb_edge.bundle import MANIFEST_NAME, BundleError, load_bundle
from llb_edge.protocol import (
    HEARTBEAT_TOPIC,
    ErrorCode,
    Heartbeat,
    ResultHeader,
    decode_frame,
    decode_published,
    encode_heartbeat,
    encode_map,
    encode_result,
    is_valid_camera_id,
    is_valid_frame_id,
)
from llb_edge.runtime.frames import decode_frame_image
from llb_edge.runtime.postprocess import error_result

REPO = Path(__file__).resolve().parents[2]
MTD = REPO.parent / "shared" / "data" / "mtd"


def fuzz_settings(examples: int) -> settings:
    # derandomize: the same examples every run, so the suite is deterministic and a failure
    # reproduces; database=None: nothing written into the repository.
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# The codes the frame parser and the image decoder may answer a frame with (docs/protocol.md).
FRAME_ERROR_CODES = {
    ErrorCode.BAD_MESSAGE,
    ErrorCode.BAD_HEADER,
    ErrorCode.UNKNOWN_VERSION,
    ErrorCode.UNKNOWN_ENCODING,
    ErrorCode.BAD_SHAPE,
    ErrorCode.BAD_DTYPE,
    ErrorCode.DECODE_FAILED,
    ErrorCode.TOO_LARGE,
}
MAX_PAYLOAD_BYTES = 200_000
MAX_PIXELS = 200_000


# ----------------------------------------------------------------------------------- strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and Infinity too: json.dumps writes them as the non-JSON tokens
    | st.text(max_size=12)
    | st.sampled_from(["", "²", "../etc", "a" * 200, "uint8", "OK", "NG", "raw", "png", "jpeg"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def mutated(draw: st.DrawFn, value: Any, rarity: int) -> Any:
    """``value`` with some of its parts, at any depth, replaced, dropped or nudged: each part
    about once in ``rarity`` draws, so that most of a big document stays valid and the parser
    gets past its first checks."""
    action = draw(st.integers(0, rarity))
    if action == 0:
        return draw(json_values)
    if isinstance(value, dict):
        kept = {key: draw(mutated(item, rarity)) for key, item in value.items() if draw(st.integers(0, rarity)) > 0}
        return kept | (draw(st.dictionaries(st.text(max_size=6), json_values, max_size=1)) if action == 1 else {})
    if isinstance(value, list):
        items = [draw(mutated(item, rarity)) for item in value]
        return items[: draw(st.integers(0, len(items)))] if action == 1 else items
    if isinstance(value, int) and not isinstance(value, bool) and action == 1:
        return draw(st.sampled_from([value + 1, -value, value * 65536, float(value), str(value)]))
    return value


def _image_seeds() -> dict[str, list[bytes]]:
    """Real MTD files and small synthetic ones of every depth and layout the decoder handles, by format."""
    rgb = square_frame(24, 32, (4, 4, 8, 8))
    seeds: dict[str, list[bytes]] = {"png": [encoded(rgb, "png")], "jpeg": [encoded(rgb, "jpeg")], "bmp": []}
    for path in (MTD / "MT_Free" / "Imgs" / "exp4_num_2657.jpg", MTD / "MT_Fray" / "Imgs" / "exp1_num_331149.png"):
        seeds["jpeg" if path.suffix == ".jpg" else "png"].append(path.read_bytes())
    for image, extension, flags in [
        (np.full((12, 10, 4), 40000, np.uint16), ".png", []),
        (np.zeros((12, 10), np.uint8), ".png", []),
        (np.zeros((12, 10), np.uint8), ".jpg", []),
        (rgb, ".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        (rgb, ".bmp", []),
    ]:
        ok, data = cv2.imencode(extension, image, flags)
        assert ok
        seeds[{".png": "png", ".jpg": "jpeg", ".bmp": "bmp"}[extension]].append(data.tobytes())
    return seeds


IMAGE_SEEDS = _image_seeds()
RAW_SHAPE = [6, 5, 3]
FRAME_TEMPLATES = {
    "raw8": {"version": 1, "camera_id": "cam1", "frame_id": 7, "encoding": "raw", "dtype": "uint8", "shape": RAW_SHAPE},
    "raw16": {"version": 1, "camera_id": "c", "frame_id": "p-1", "encoding": "raw", "dtype": "uint16", "shape": [6, 5]},
    "png": {"version": 1, "camera_id": "cam1", "frame_id": 8, "encoding": "png", "capture_ts": 1.5},
    "jpeg": {"version": 1, "camera_id": "cam1", "frame_id": 9, "encoding": "jpeg"},
}


@st.composite
def mutated_bytes(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few bytes overwritten, cut short or with garbage appended."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 4))):
        # Most flips land in the first bytes, where the headers the parsers read are.
        limit = min(len(data), draw(st.sampled_from([16, 64, 400, len(data)])))
        if limit:
            data[draw(st.integers(0, limit - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data) + draw(st.binary(max_size=4))


def _payloads_for(kind: str) -> st.SearchStrategy[bytes]:
    if kind.startswith("raw"):
        size = int(np.prod(FRAME_TEMPLATES[kind]["shape"])) * (2 if kind == "raw16" else 1)
        return st.sampled_from([bytes(size), bytes(range(size % 256, 256)) * 2, bytes(size + 1)])
    return st.sampled_from(IMAGE_SEEDS[kind]).flatmap(mutated_bytes)


any_payload = st.binary(max_size=64) | st.sampled_from(sum(IMAGE_SEEDS.values(), [])).flatmap(mutated_bytes)


@st.composite
def frame_messages(draw: st.DrawFn) -> list[bytes]:
    """Mostly a mutated header with a payload of its encoding, so that many frames get past the
    header checks into the image decoder; sometimes random header bytes, another payload, or a
    wrong number of parts."""
    kind = draw(st.sampled_from(sorted(FRAME_TEMPLATES)))
    if draw(st.integers(0, 7)) == 0:
        header = draw(st.binary(max_size=40))
    else:
        header = json.dumps(draw(mutated(FRAME_TEMPLATES[kind], rarity=20))).encode()
    payload = draw(any_payload) if draw(st.integers(0, 5)) == 0 else draw(_payloads_for(kind))
    parts = draw(st.sampled_from([2] * 12 + [0, 1, 3]))
    return [header, payload, payload][:parts]


def _valid_published() -> list[dict[str, Any]]:
    info, _ = encode_map(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), "uint8", (0.0, 0.0, 8.0, 8.0))
    inspection = ResultHeader(
        camera_id="cam1", frame_id=3, decision="NG", score=0.5, score_max=0.9, threshold=0.1,
        region=None, image_size=(8, 8), model_id="m", model_version="1", backend="ort-cpu",
        latency_ms={"total": 1.0}, capture_ts=1.0, published_ts=2.0, map=info,
    )  # fmt: skip
    failed = error_result("cam1", "f", 1.0, ErrorCode.DECODE_FAILED, "why", None)
    heartbeat = Heartbeat(ts=1.0, seq=2, state="serving", ready=True)
    return [
        json.loads(encode_result(inspection, bytes(16))[1]),
        json.loads(encode_result(failed)[1]),
        json.loads(encode_heartbeat(heartbeat)[1]),
    ]


published_headers = st.sampled_from(_valid_published()).flatmap(lambda header: mutated(header, rarity=20))
published_messages = st.tuples(
    st.sampled_from([b"result/cam1", b"result/", HEARTBEAT_TOPIC, b"other"]) | st.binary(max_size=12),
    published_headers.map(lambda values: json.dumps(values).encode()) | st.binary(max_size=40),
    st.sampled_from([None, bytes(16), bytes(32), b"\x00"]) | st.binary(max_size=40),
).map(lambda drawn: [part for part in drawn if part is not None])


# ----------------------------------------------------------------------------------------- tests


@fuzz_settings(1500)
@given(parts=frame_messages())
def test_frame_parser_refuses_only_with_documented_codes(parts: list[bytes]) -> None:
    try:
        header, payload = decode_frame(parts, max_payload_bytes=MAX_PAYLOAD_BYTES)
        image = decode_frame_image(header, payload, max_pixels=MAX_PIXELS)
    except Exception as err:  # noqa: BLE001 - anything but a documented ProtocolError fails
        assert getattr(err, "code", None) in FRAME_ERROR_CODES, f"{type(err).__name__}: {err}"
        if err.attributable:
            assert is_valid_camera_id(err.camera_id) and is_valid_frame_id(err.frame_id)
            # The daemon answers it: the error result must encode (strict JSON, no NaN).
            encode_result(error_result(err.camera_id, err.frame_id, err.capture_ts, err.code, err.message, None))
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] * image.shape[1] <= MAX_PIXELS


@fuzz_settings(1500)
@given(parts=published_messages)
def test_result_and_heartbeat_decoder_refuses_only_with_protocol_errors(parts: list[bytes]) -> None:
    try:
        decode_published(parts)
    except Exception as err:  # noqa: BLE001 - anything but a documented ProtocolError fails
        assert getattr(err, "code", None) in set(ErrorCode) - {ErrorCode.INTERNAL}, f"{type(err).__name__}: {err}"


@pytest.fixture(scope="module")
def fuzzed_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A bundle folder and its valid manifest; each example overwrites bundle.json. The model file
    is a stand-in: loading checks the file's bytes, not its ONNX."""
    stand_in = tmp_path_factory.mktemp("fuzz-model") / "model.onnx"
    stand_in.write_bytes(b"not really onnx")
    root = make_bundle(tmp_path_factory.mktemp("fuzz-bundle"), stand_in)
    return root, json.loads((root / MANIFEST_NAME).read_text())


@fuzz_settings(600)
@given(data=st.data())
def test_bundle_loader_refuses_only_with_bundle_errors(
    fuzzed_bundle: tuple[Path, dict[str, Any]], data: st.DataObject
) -> None:
    root, template = fuzzed_bundle
    manifest = data.draw(mutated(template, rarity=40) | st.binary(max_size=60), label="manifest")
    (root / MANIFEST_NAME).write_bytes(manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode())
    with contextlib.suppress(BundleError):
        load_bundle(root)
