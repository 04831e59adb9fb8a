"""Per-camera regions of interest: only this part of a camera's frames is inspected.

A region of interest is a rectangle in the camera's original frame pixels (``x,y,width,height``),
optionally refined by a mask image the size of the frame (non-zero = inspected). The daemon cuts
the rectangle out of each frame before the bundle's pre-processing, so the model sees the region
at its full input resolution; maps and region boxes come back in original frame pixels. Pixels
outside the rectangle, or outside the mask, are **not inspected**: a defect there never makes a
frame NG (docs/protocol.md).

With a mask, the image score is recomputed on the map cells inside the mask (the bundle's
top-fraction mean over those cells, ``extra.top_fraction``), and the map is 0 outside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from llb_edge.errors import LLBEdgeError


class RegionOfInterestError(LLBEdgeError, ValueError):
    """A region-of-interest setting that cannot be used."""


@dataclass(frozen=True)
class RegionOfInterest:
    x: int
    y: int
    width: int
    height: int
    # bool [height, width] over the rectangle: True = inspected; None = the whole rectangle.
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    # A mask is drawn for one frame size: frames of another size are refused.
    frame_size: tuple[int, int] | None = None  # (height, width)

    def __post_init__(self) -> None:
        if self.x < 0 or self.y < 0 or self.width < 1 or self.height < 1:
            raise RegionOfInterestError(f"region of interest {self.describe()} must have x, y >= 0 and a positive size")
        if self.mask is not None and (self.mask.shape != (self.height, self.width) or not self.mask.any()):
            raise RegionOfInterestError("a region-of-interest mask must cover the rectangle and mark some pixels")

    def describe(self) -> str:
        return f"x={self.x},y={self.y},w={self.width},h={self.height}" + (" with mask" if self.mask is not None else "")

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in original frame pixels."""
        return self.x, self.y, self.x + self.width, self.y + self.height

    def misfit(self, height: int, width: int) -> str | None:
        """Why a frame of this size cannot be inspected with this region, or None when it can."""
        if self.frame_size is not None and (height, width) != self.frame_size:
            return (f"frame is {height}x{width} but the region-of-interest mask was drawn for "
                    f"{self.frame_size[0]}x{self.frame_size[1]}")
        if self.x + self.width > width or self.y + self.height > height:
            return f"region of interest {self.describe()} does not fit in a {height}x{width} frame"
        return None

    def cut(self, image: np.ndarray) -> np.ndarray:
        """The rectangle of ``image`` (a view; the caller checked :meth:`misfit`)."""
        return image[self.y : self.y + self.height, self.x : self.x + self.width]

    def mask_at(self, height: int, width: int) -> np.ndarray | None:
        """The mask resized to ``height x width`` (a cell is inspected when most of it is), or None."""
        if self.mask is None:
            return None
        resized = cv2.resize(self.mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
        inside = resized >= 0.5
        if not inside.any():  # a thin mask can vanish at map resolution: keep its strongest cell
            inside.flat[int(np.argmax(resized))] = True
        return inside


def masked_scores(anomaly_map: np.ndarray, inside: np.ndarray, top_fraction: float) -> tuple[float, float]:
    """(score, score_max) over the map cells inside the mask, as the graph computes them over all cells."""
    values = anomaly_map.reshape(inside.shape)[inside]
    top = max(1, math.floor(values.size * top_fraction))
    return float(np.sort(values)[-top:].mean()), float(values.max())


def parse_box(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, width, height = (int(part) for part in text.split(","))
    except ValueError as err:
        raise RegionOfInterestError(f"a region of interest is x,y,width,height in frame pixels, got {text!r}") from err
    return x, y, width, height


def read_mask(path: str | Path) -> np.ndarray:
    """A mask image (any format OpenCV reads) as bool: non-zero = inspected."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise RegionOfInterestError(f"cannot read the region-of-interest mask {path}")
    if not image.any():
        raise RegionOfInterestError(f"the region-of-interest mask {path} marks no pixel (non-zero = inspected)")
    return image > 0


def region_of_interest(box: tuple[int, int, int, int] | None, mask: np.ndarray | None) -> RegionOfInterest:
    """A rectangle, a frame-sized mask, or both (the mask is then cut to the rectangle)."""
    if box is None and mask is None:
        raise RegionOfInterestError("a region of interest needs a rectangle, a mask, or both")
    if mask is None:
        assert box is not None
        return RegionOfInterest(*box)
    if box is None:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = (int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))
    x, y, width, height = box
    if x + width > mask.shape[1] or y + height > mask.shape[0]:
        raise RegionOfInterestError(f"region of interest {box} is outside its {mask.shape[0]}x{mask.shape[1]} mask")
    return RegionOfInterest(x, y, width, height, mask=mask[y : y + height, x : x + width],
                            frame_size=(int(mask.shape[0]), int(mask.shape[1])))


def parse_regions(boxes: list[str], masks: list[str]) -> dict[str, RegionOfInterest]:
    """``CAMERA=x,y,w,h`` and ``CAMERA=mask.png`` settings (the serve command's --roi, --roi-mask) per camera."""

    def split(item: str, what: str) -> tuple[str, str]:
        camera, sep, value = item.partition("=")
        if not sep or not camera.strip() or not value.strip():
            raise RegionOfInterestError(f"{what} settings are CAMERA=VALUE, got {item!r}")
        return camera.strip(), value.strip()

    box_of: dict[str, tuple[int, int, int, int]] = {}
    mask_of: dict[str, np.ndarray] = {}
    for item in boxes:
        camera, value = split(item, "--roi")
        if camera in box_of:
            raise RegionOfInterestError(f"camera {camera!r} has two regions of interest")
        box_of[camera] = parse_box(value)
    for item in masks:
        camera, value = split(item, "--roi-mask")
        if camera in mask_of:
            raise RegionOfInterestError(f"camera {camera!r} has two region-of-interest masks")
        mask_of[camera] = read_mask(value)
    return {camera: region_of_interest(box_of.get(camera), mask_of.get(camera))
            for camera in sorted(set(box_of) | set(mask_of))}
