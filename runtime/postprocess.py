"""Per-frame post-processing: decision, largest defect region in original pixels, result header.

Decision rule (documented in docs/protocol.md): ``score >= threshold`` is NG, where the threshold
is the bundle's (bundle.json ``threshold.value``, re-read on every reload) unless an operator set
a runtime override through the control socket.

Region rule: only an NG result carries a region, and the region follows the threshold in use
(override included): the model's M x M map is mapped back onto the inspected part of the frame
(``Geometry.map_to_original``, bilinear), pixels with ``value >= threshold`` are defect, and the
largest 8-connected component is reported as its area in pixels and its bounding box in original
frame pixels. The score is the mean of the map's hottest cells, so an NG map always holds cells
at or above the threshold; should bilinear up-sampling shave the peak just below it, the level
drops to the peak, so an NG result never lacks its box.

With a camera's region of interest (runtime/roi.py) the inspected part is that rectangle: maps and
boxes are offset into the frame, and a mask zeroes the map outside it and recomputes the score
over the cells inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from llb_edge.bundle import Bundle
from llb_edge.config import EvalConfig
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
from llb_edge.runtime.roi import RegionOfInterest, masked_scores


def top_fraction_of(bundle: Bundle) -> float:
    """The fraction of map cells the graph's score averages (bundle.json ``extra.top_fraction``)."""
    recorded = bundle.top_fraction
    return EvalConfig.top_fraction if recorded is None else recorded


@dataclass(frozen=True)
class InspectedArea:
    """The part of the frame the model saw: the whole frame, or a camera's region of interest."""

    x: int
    y: int
    height: int
    width: int
    roi: RegionOfInterest | None = None

    @classmethod
    def of(cls, height: int, width: int, roi: RegionOfInterest | None) -> InspectedArea:
        if roi is None:
            return cls(0, 0, height, width)
        return cls(roi.x, roi.y, roi.height, roi.width, roi)

    def map_box(self, geometry: Geometry) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in original frame pixels that the model's map covers."""
        x0, y0, x1, y1 = geometry.crop_box(self.height, self.width)
        return x0 + self.x, y0 + self.y, x1 + self.x, y1 + self.y


def largest_region(
    anomaly_map: np.ndarray, geometry: Geometry, area: InspectedArea, threshold: float
) -> Region | None:
    """The largest connected region with map value >= threshold (or the peak, if lower), in frame pixels."""
    full = geometry.map_to_original(anomaly_map.reshape(anomaly_map.shape[-2:]), area.height, area.width)
    if area.roi is not None and area.roi.mask is not None:
        full[~area.roi.mask] = 0.0
    level = min(threshold, float(full.max()))
    mask = (full >= level).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:  # label 0 is the background
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h, size = (int(v) for v in stats[largest])
    return Region(area_px=size, bbox=(x + area.x, y + area.y, w, h))


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
    geometry: Geometry,
    height: int,
    width: int,
    identity: ModelIdentity,
    map_encoding: str | None,
    roi: RegionOfInterest | None = None,
    top_fraction: float = EvalConfig.top_fraction,
) -> tuple[ResultHeader, bytes | None]:
    """The result header (latencies filled in later by the caller) and the optional map payload.

    ``anomaly_map`` covers the model input made from the frame (``height x width``), or from its
    region of interest ``roi`` when the camera has one.
    """
    if not (math.isfinite(score) and math.isfinite(score_max) and np.all(np.isfinite(anomaly_map))):
        return error_result(
            camera_id, frame_id, capture_ts, ErrorCode.INFERENCE_FAILED, "model returned non-finite values", identity
        ), None
    area = InspectedArea.of(height, width, roi)
    inside = roi.mask_at(*anomaly_map.shape[-2:]) if roi is not None else None
    if inside is not None:
        grid = anomaly_map.reshape(inside.shape)
        score, score_max = masked_scores(grid, inside, top_fraction)
        anomaly_map = np.where(inside, grid, 0.0).astype(np.float32)
    ng = score >= threshold
    # Only NG frames are labelled: the common OK frame skips the full-resolution resize entirely.
    region = largest_region(anomaly_map, geometry, area, threshold) if ng else None
    map_info: MapInfo | None = None
    payload: bytes | None = None
    if map_encoding is not None:
        map_info, payload = encode_map(anomaly_map, map_encoding, area.map_box(geometry))
    header = ResultHeader(
        camera_id=camera_id,
        frame_id=frame_id,
        decision=DECISION_NG if ng else DECISION_OK,
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
