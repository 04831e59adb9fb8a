"""Per-frame post-processing: decision, largest defect region in original pixels, result header.

Decision rule (documented in docs/protocol.md): ``score >= threshold`` is NG, where the threshold
is the bundle's (bundle.json ``threshold.value``, re-read on every reload) unless an operator set
a runtime override through the control socket.

Region rule: the model's M x M map is mapped back onto the original frame with
``Geometry.map_to_original`` (bilinear; pixels outside the model's crop are 0), pixels with
``value >= pixel_threshold`` are defect, and the largest 8-connected component is reported as its
area in pixels and its bounding box. ``pixel_threshold`` is bundle.json ``extra.pixel_threshold``
when the exporter calibrated one, else the image threshold: a pixel as anomalous as a rejected
image's score is part of the defect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from llb_edge.bundle import Bundle
from llb_edge.data.transforms import Geometry
from llb_edge.protocol import (
    DECISION_NG,
    DECISION_OK,
    ErrorCode,
    ErrorInfo,
    MapInfo,
    Region,
    ResultHeader,
    encode_map,
)

PIXEL_THRESHOLD_KEY = "pixel_threshold"


def pixel_threshold_of(bundle: Bundle) -> float:
    value = bundle.manifest.extra.get(PIXEL_THRESHOLD_KEY)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return bundle.threshold


def largest_region(
    anomaly_map: np.ndarray, geometry: Geometry, height: int, width: int, pixel_threshold: float
) -> Region | None:
    """The largest connected region with map value >= pixel_threshold, in original pixels."""
    full = geometry.map_to_original(anomaly_map.reshape(anomaly_map.shape[-2:]), height, width)
    mask = (full >= pixel_threshold).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:  # label 0 is the background
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h, area = (int(v) for v in stats[largest])
    return Region(area_px=area, bbox=(x, y, w, h))


@dataclass(frozen=True)
class ModelIdentity:
    """What every result says about the model that produced it."""

    model_id: str
    model_version: str
    backend: str


def inspection_result(
    *,
    camera_id: str,
    frame_id: int | str,
    capture_ts: float | None,
    anomaly_map: np.ndarray,
    score: float,
    score_max: float,
    threshold: float,
    pixel_threshold: float,
    geometry: Geometry,
    height: int,
    width: int,
    identity: ModelIdentity,
    map_encoding: str | None,
) -> tuple[ResultHeader, bytes | None]:
    """The result header (latencies filled in later by the caller) and the optional map payload."""
    if not (math.isfinite(score) and math.isfinite(score_max) and np.all(np.isfinite(anomaly_map))):
        return error_result(
            camera_id, frame_id, capture_ts, ErrorCode.INFERENCE_FAILED, "model returned non-finite values", identity
        ), None
    # The graph's score_max is the map's max, so a frame with no pixel over the pixel threshold
    # skips the full-resolution resize and labelling entirely (the common, OK case).
    region = (
        largest_region(anomaly_map, geometry, height, width, pixel_threshold) if score_max >= pixel_threshold else None
    )
    map_info: MapInfo | None = None
    payload: bytes | None = None
    if map_encoding is not None:
        map_info, payload = encode_map(anomaly_map, map_encoding, geometry.crop_box(height, width))
    header = ResultHeader(
        camera_id=camera_id,
        frame_id=frame_id,
        decision=DECISION_NG if score >= threshold else DECISION_OK,
        score=float(score),
        score_max=float(score_max),
        threshold=float(threshold),
        region=region,
        image_size=(height, width),
        model_id=identity.model_id,
        model_version=identity.model_version,
        backend=identity.backend,
        capture_ts=capture_ts,
        map=map_info,
    )
    return header, payload


def error_result(
    camera_id: str,
    frame_id: int | str,
    capture_ts: float | None,
    code: ErrorCode,
    message: str,
    identity: ModelIdentity | None,
) -> ResultHeader:
    return ResultHeader(
        camera_id=camera_id,
        frame_id=frame_id,
        decision=None,
        model_id=identity.model_id if identity else None,
        model_version=identity.model_version if identity else None,
        backend=identity.backend if identity else None,
        capture_ts=capture_ts,
        error=ErrorInfo(code=code, message=message),
    )
