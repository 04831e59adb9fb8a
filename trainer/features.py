"""Training images and their frozen-encoder features.

The encoder is frozen and there is no augmentation, so an image's encoder features are the same in
every training step, in every LLB sub-model and in scoring. ``EncodedImages`` computes them once
and serves batches from memory (``cached=True``), or recomputes them per batch (``cached=False``,
the plain path, kept to check that both give the same results).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from llb_edge.data.images import read_image_rgb
from llb_edge.data.samples import Sample
from llb_edge.data.transforms import Geometry
from llb_edge.models.dinomaly import Dinomaly, EncoderFeatures, normalize_uint8_nhwc


def load_model_inputs(samples: list[Sample], geometry: Geometry, desc: str = "loading images") -> np.ndarray:
    """uint8 [N, crop, crop, 3]: every image decoded and pre-processed once."""
    out = np.empty((len(samples), geometry.crop, geometry.crop, 3), dtype=np.uint8)
    for i, sample in enumerate(tqdm(samples, desc=desc, unit="img", leave=False, disable=len(samples) < 64)):
        out[i] = geometry.to_model_input(read_image_rgb(sample.path))
    return out


class EncodedImages:
    """Encoder features of a fixed image set, served by index."""

    def __init__(
        self,
        model: Dinomaly,
        images: np.ndarray,
        device: torch.device,
        cached: bool = True,
        batch_size: int = 16,
        storage_dtype: torch.dtype = torch.float32,
        storage_device: torch.device | None = None,
    ) -> None:
        self.model = model
        self.images = images
        self.device = device
        self.cached = cached
        self.batch_size = batch_size
        self.fused: torch.Tensor | None = None
        self.groups: list[torch.Tensor] = []
        if cached:
            self._fill_cache(storage_dtype, storage_device or device)

    def __len__(self) -> int:
        return len(self.images)

    def _encode(self, indices: np.ndarray) -> EncoderFeatures:
        batch = torch.from_numpy(self.images[indices]).to(self.device)
        return self.model.encode(normalize_uint8_nhwc(batch))

    def _fill_cache(self, dtype: torch.dtype, storage: torch.device) -> None:
        n = len(self.images)
        order = np.arange(n)
        chunks = range(0, n, self.batch_size)
        for start in tqdm(chunks, desc="encoding features", unit="batch", leave=False, disable=len(chunks) < 4):
            features = self._encode(order[start : start + self.batch_size])
            if self.fused is None:
                self.fused = torch.empty((n, *features.fused.shape[1:]), dtype=dtype, device=storage)
                self.groups = [torch.empty((n, *g.shape[1:]), dtype=dtype, device=storage) for g in features.groups]
            stop = start + features.fused.shape[0]
            self.fused[start:stop] = features.fused.to(storage, dtype)
            for cache, group in zip(self.groups, features.groups, strict=True):
                cache[start:stop] = group.to(storage, dtype)

    def batch(self, indices: np.ndarray) -> EncoderFeatures:
        if not self.cached:
            return self._encode(indices)
        index = torch.as_tensor(indices, dtype=torch.long, device=self.fused.device)
        return EncoderFeatures(
            fused=self.fused[index].to(self.device, torch.float32),
            groups=[g[index].to(self.device, torch.float32) for g in self.groups],
        )
