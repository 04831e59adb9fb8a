"""Training images and their frozen-encoder features.

The encoder is frozen and there is no augmentation, so an image's encoder features are the same in
every training step, in every LLB sub-model and in scoring. ``EncodedImages`` computes them once
and serves batches from memory (``cached=True``), or recomputes them per batch (``cached=False``,
the plain path, kept to check that both give the same results).

Where the cache lives (``location``):

- ``device``: on the training GPU, the fastest;
- ``host``: in CPU memory, each batch copied to the device;
- ``disk``: a memory-mapped file under ``spill_dir`` (deleted when the object goes away), for
  feature sets larger than the memory budget: RAM then only holds what the page cache keeps;
- ``auto``: device if the cache fits both the budget and half the free GPU memory, else host if
  it fits the budget, else disk.

``EncodedImages.from_config`` applies ``TrainConfig`` (float16 storage, location, budget). fp16
halves the footprint; its rounding (relative 5e-4) is far below what changes a trained model's
ranking, and tests/test_llb.py checks that cached and uncached stage-1 scores agree.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llb_edge.config import TrainConfig
from llb_edge.data.images import read_image_rgb
from llb_edge.data.samples import Sample
from llb_edge.data.transforms import Geometry
from llb_edge.models.dinomaly import Dinomaly, EncoderFeatures, normalize_uint8_nhwc

LOCATIONS = ("auto", "device", "host", "disk")


def load_model_inputs(samples: list[Sample], geometry: Geometry, desc: str = "loading images") -> np.ndarray:
    """uint8 [N, crop, crop, 3]: every image decoded and pre-processed once."""
    out = np.empty((len(samples), geometry.crop, geometry.crop, 3), dtype=np.uint8)
    for i, sample in enumerate(tqdm(samples, desc=desc, unit="img", leave=False, disable=len(samples) < 64)):
        out[i] = geometry.to_model_input(read_image_rgb(sample.path))
    return out


def choose_location(location: str, total_bytes: int, budget_gb: float | None, device: torch.device) -> str:
    """Resolve ``auto`` (and ``device`` on a CPU run) to where the cache will actually live."""
    if location not in LOCATIONS:
        raise ValueError(f"cache location must be one of {', '.join(LOCATIONS)}, got {location!r}")
    if location == "device" and device.type != "cuda":
        return "host"  # on a CPU run, device memory is host memory
    if location != "auto":
        return location
    fits_budget = budget_gb is None or total_bytes <= budget_gb * 2**30
    if not fits_budget:
        return "disk"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Keep half the free memory for the decoders being trained (k of them with concurrency).
        if total_bytes <= free // 2:
            return "device"
    return "host"


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
        location: str | None = None,
        budget_gb: float | None = None,
        spill_dir: Path | None = None,
    ) -> None:
        self.model = model
        self.images = images
        self.device = device
        self.cached = cached
        self.batch_size = batch_size
        self.fused: torch.Tensor | None = None
        self.groups: list[torch.Tensor] = []
        # Without ``location`` the features are stored on ``device``; otherwise the storage is
        # resolved from the estimated size once the first batch shows the feature shapes.
        self.location = location
        self.budget_gb = budget_gb
        self.spill_dir = spill_dir
        self.storage_bytes = 0
        if cached:
            self._fill_cache(storage_dtype)

    @classmethod
    def from_config(
        cls, model: Dinomaly, images: np.ndarray, device: torch.device, cfg: TrainConfig,
        spill_dir: Path | None = None,
    ) -> EncodedImages:
        """The training cache as ``cfg`` asks: fp16, placed by cache_location / cache_budget_gb."""
        return cls(model, images, device, cached=cfg.cache_features, batch_size=cfg.batch_size,
                   storage_dtype=torch.float16, location=cfg.cache_location, budget_gb=cfg.cache_budget_gb,
                   spill_dir=spill_dir)

    def __len__(self) -> int:
        return len(self.images)

    def _encode(self, indices: np.ndarray) -> EncoderFeatures:
        batch = torch.from_numpy(self.images[indices]).to(self.device)
        return self.model.encode(normalize_uint8_nhwc(batch))

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, storage: torch.device, name: str) -> torch.Tensor:
        if self.location != "disk":
            return torch.empty(shape, dtype=dtype, device=storage)
        # A float16 memmap wrapped as a tensor: indexing it reads only the pages a batch touches.
        np_dtype = {torch.float16: np.float16, torch.float32: np.float32}[dtype]
        array = np.lib.format.open_memmap(self._spill_path / f"{name}.npy", mode="w+", dtype=np_dtype, shape=shape)
        return torch.from_numpy(array)

    def _prepare_storage(self, first: EncoderFeatures, n: int, dtype: torch.dtype) -> torch.Tensor:
        per_image = first.fused[0].numel() + sum(g[0].numel() for g in first.groups)
        self.storage_bytes = n * per_image * torch.empty((), dtype=dtype).element_size()
        storage = self.device
        if self.location is not None:
            self.location = choose_location(self.location, self.storage_bytes, self.budget_gb, self.device)
            storage = self.device if self.location == "device" else torch.device("cpu")
            if self.location == "disk":
                parent = Path(self.spill_dir) if self.spill_dir is not None else None
                if parent is not None:
                    parent.mkdir(parents=True, exist_ok=True)
                self._spill_path = Path(tempfile.mkdtemp(prefix="feature_cache_", dir=parent))
                # The spill file can be many GB: remove it with the object (or at interpreter exit).
                weakref.finalize(self, shutil.rmtree, str(self._spill_path), True)
        self.fused = fused = self._allocate((n, *first.fused.shape[1:]), dtype, storage, "fused")
        self.groups = [self._allocate((n, *g.shape[1:]), dtype, storage, f"group{i}")
                       for i, g in enumerate(first.groups)]
        return fused

    def _fill_cache(self, dtype: torch.dtype) -> None:
        n = len(self.images)
        order = np.arange(n)
        chunks = range(0, n, self.batch_size)
        for start in tqdm(chunks, desc="encoding features", unit="batch", leave=False, disable=len(chunks) < 4):
            features = self._encode(order[start : start + self.batch_size])
            fused = self.fused if self.fused is not None else self._prepare_storage(features, n, dtype)
            stop = start + features.fused.shape[0]
            fused[start:stop] = features.fused.to(fused.device, dtype)
            for cache, group in zip(self.groups, features.groups, strict=True):
                cache[start:stop] = group.to(cache.device, dtype)

    def batch(self, indices: np.ndarray) -> EncoderFeatures:
        if not self.cached:
            return self._encode(indices)
        assert self.fused is not None  # filled by __init__ when cached
        index = torch.as_tensor(indices, dtype=torch.long, device=self.fused.device)
        return EncoderFeatures(
            fused=self.fused[index].to(self.device, torch.float32),
            groups=[g[index].to(self.device, torch.float32) for g in self.groups],
        )
