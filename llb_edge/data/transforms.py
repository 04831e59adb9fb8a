"""Pre-processing geometry shared by training, export and the line-side runtime.

One implementation serves all three, so a frame on the line goes through exactly the pixels path
the model was trained on (the exported-scores-differ class of bugs, line-side.md point 1):

1. any image (gray, RGB, RGBA, 8 or 16 bit) becomes uint8 RGB (``images.read_image_rgb``);
2. it is resized to ``resize x resize`` with OpenCV bilinear interpolation (aspect not kept,
   no antialiasing), then centre-cropped to ``crop x crop``;
3. normalisation (ImageNet mean/std) happens inside the model, on uint8 input.

Masks follow the same geometry as float, then are binarised at > 0.5 (method.md leaves this open;
the reference used > 0, which dilates masks by about a pixel).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Geometry:
    resize: int = 448
    crop: int = 392

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"crop ({self.crop}) must be in 1..resize ({self.resize})")

    @property
    def offset(self) -> int:
        return (self.resize - self.crop) // 2

    def to_model_input(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 image of any size -> uint8 crop x crop x 3."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected a uint8 HxWx3 image, got {rgb.dtype} {rgb.shape}")
        resized = cv2.resize(rgb, (self.resize, self.resize), interpolation=cv2.INTER_LINEAR)
        o = self.offset
        return np.ascontiguousarray(resized[o : o + self.crop, o : o + self.crop])

    def mask_to_model(self, mask: np.ndarray) -> np.ndarray:
        """Boolean HxW mask of the original image -> boolean crop x crop mask (> 0.5 after resize)."""
        resized = cv2.resize(mask.astype(np.float32), (self.resize, self.resize), interpolation=cv2.INTER_LINEAR)
        o = self.offset
        return resized[o : o + self.crop, o : o + self.crop] > 0.5

    def crop_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in original-image pixels that the model's crop covers."""
        sx, sy = width / self.resize, height / self.resize
        o = self.offset
        return (o * sx, o * sy, (o + self.crop) * sx, (o + self.crop) * sy)

    def map_to_original(self, anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
        """A map covering the model crop (any square size) -> float32 HxW in original pixels.

        Pixels outside the crop were never seen by the model and are 0.
        """
        x0, y0, x1, y1 = self.crop_box(height, width)
        ix0, iy0 = int(round(x0)), int(round(y0))
        ix1, iy1 = max(int(round(x1)), ix0 + 1), max(int(round(y1)), iy0 + 1)
        out = np.zeros((height, width), dtype=np.float32)
        patch = cv2.resize(anomaly_map.astype(np.float32), (ix1 - ix0, iy1 - iy0), interpolation=cv2.INTER_LINEAR)
        out[iy0:iy1, ix0:ix1] = patch
        return out
