"""LLB stage-1 sub-models: fit on one subset of the training images, score every training image.

The screening machinery in ``trainer/llb.py`` only talks to the :class:`SubModel` interface, so
any unsupervised detector can be a sub-model (the framework is model-agnostic, method.md section
2). Two are provided, both working on the shared frozen-encoder features of ``EncodedImages``
(computed once per run, never per sub-model):

- ``dinomaly``: a fresh bottleneck + decoder on the shared frozen encoder, trained with the normal
  Dinomaly recipe for ``llb.submodel_iterations``; image score = the Dinomaly score (method.md
  section 5: mean of the top 1% of the smoothed map).
- ``knn``: training-free. The sub-model is a memory bank of its subset's patch features (the two
  encoder groups, each L2-normalised along channels, concatenated per patch), subsampled with a
  seeded random choice to at most ``llb.knn_bank_size`` patches. A patch's distance is the
  Euclidean distance to its nearest bank patch; the image score is the MAX over the image's
  patches (the "top patch" distance of PatchCore-style scoring; not the top-1% mean, which at 28x28
  patches would be the mean of 7 values and blur single small defects). When an image of the
  sub-model's own subset is scored, bank patches taken from that same image are ignored
  (leave-one-image-out): a memory bank memorises exactly, so otherwise those patches would match
  themselves at distance 0 and the own-subset score would measure the subsample, not the image.

Positions are indices into the ``EncodedImages`` (and the training sample list); the caller keys
everything by path.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from llb_edge.config import RunConfig
from llb_edge.models.dinomaly import AnomalyScorer, DinoEncoder, Dinomaly, encoder_spec
from llb_edge.trainer.evaluate import score_encoded
from llb_edge.trainer.features import EncodedImages
from llb_edge.trainer.train import train_dinomaly

T = TypeVar("T")

# Bound on one chunk of the knn distance matrix (float32 elements): 2**26 = 256 MiB.
CDIST_ELEMENTS = 1 << 26


@dataclass
class Stage1Context:
    """What every sub-model shares: the config, the frozen encoder, its cached features, the scorer."""

    cfg: RunConfig
    encoder: DinoEncoder
    features: EncodedImages
    scorer: AnomalyScorer

    @property
    def device(self) -> torch.device:
        return self.features.device


class SubModel(ABC):
    """One stage-1 sub-model. ``directory`` holds its weights (and training checkpoint, log)."""

    kind = ""
    WEIGHTS: ClassVar[str]  # the file in ``directory`` that :meth:`save` writes and :meth:`load` reads

    def __init__(self, ctx: Stage1Context, index: int, seed: int, directory: Path) -> None:
        self.ctx = ctx
        self.index = index
        self.seed = seed
        self.directory = directory

    @abstractmethod
    def fit(self, positions: np.ndarray, resume: bool) -> dict[str, Any]:
        """Fit on the images at ``positions``; returns a small record (time, loss, ...) for the logs."""

    @abstractmethod
    def score(self, positions: np.ndarray) -> np.ndarray:
        """Image anomaly scores, float [len(positions)], higher = more anomalous."""

    @abstractmethod
    def anomaly_maps(self, positions: np.ndarray) -> np.ndarray:
        """Anomaly maps, float32 [len(positions), map_size, map_size], for the screening report."""

    @abstractmethod
    def patch_scores(self, positions: np.ndarray) -> np.ndarray:
        """Per-patch anomaly scores, float32 [len(positions), grid, grid], in the image score's units
        (the image score is their maximum, or close to it): what patch-level screening thresholds."""

    @abstractmethod
    def save(self) -> None:
        """Persist what the fitted sub-model needs to score again into ``directory``."""

    @abstractmethod
    def load(self) -> None:
        """Restore a sub-model saved by :meth:`save` (same features, same config)."""


class DinomalySubModel(SubModel):
    """A fresh Dinomaly decoder on the shared frozen encoder, trained on its subset."""

    kind = "dinomaly"
    WEIGHTS = "model.safetensors"
    CHECKPOINT = "checkpoint.safetensors"

    def __init__(self, ctx: Stage1Context, index: int, seed: int, directory: Path) -> None:
        super().__init__(ctx, index, seed, directory)
        # Seeded here so the decoder's initial weights depend on (llb.seed, subset) only. Global
        # RNG: callers must build sub-models one at a time (llb.py does, before any thread starts).
        torch.manual_seed(seed)
        heads = encoder_spec(ctx.cfg.model.encoder).num_heads
        self.model = Dinomaly(ctx.encoder, heads, ctx.cfg.model.dropout).to(ctx.device)

    def fit(self, positions: np.ndarray, resume: bool) -> dict[str, Any]:
        llb = self.ctx.cfg.llb
        self.directory.mkdir(parents=True, exist_ok=True)
        result = train_dinomaly(
            self.model, self.ctx.features, positions, self.ctx.cfg.train, llb.submodel_iterations, self.seed,
            checkpoint=self.directory / self.CHECKPOINT, resume=resume,
            log_path=self.directory / "train_log.jsonl", desc=f"sub-model {self.index + 1}/{llb.k}",
        )
        return {"iterations": result.iterations, "final_loss": result.final_loss, "seconds": result.seconds}

    def score(self, positions: np.ndarray) -> np.ndarray:
        scores, _ = score_encoded(self.model, self.ctx.scorer, self.ctx.features, positions)
        return scores

    @torch.no_grad()
    def anomaly_maps(self, positions: np.ndarray) -> np.ndarray:
        self.model.eval()
        batch = self.ctx.features.batch(positions)
        maps, _, _ = self.ctx.scorer(batch.groups, self.model.decode(batch.fused))
        return maps[:, 0].float().cpu().numpy()

    def patch_scores(self, positions: np.ndarray) -> np.ndarray:
        grid = self.ctx.encoder.grid
        maps = torch.from_numpy(self.anomaly_maps(positions))[:, None]
        return F.adaptive_max_pool2d(maps, grid)[:, 0].numpy()

    def save(self) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.trainable_state_dict().items()}
        save_file(state, str(self.directory / self.WEIGHTS))
        # The finished weights replace the checkpoint (4x their size with the optimiser state).
        (self.directory / self.CHECKPOINT).unlink(missing_ok=True)

    def load(self) -> None:
        self.model.load_trainable_state_dict(load_file(str(self.directory / self.WEIGHTS)))
        self.model.eval()


def patch_vectors(features: EncodedImages, positions: np.ndarray) -> torch.Tensor:
    """[B, patches, 2*dim]: both encoder groups per patch, each L2-normalised, concatenated.

    Normalising each group keeps the shallow and the deep group on the same scale (their raw
    norms differ a lot in DINOv2), so neither dominates the distance.
    """
    groups = features.batch(positions).groups  # each [B, dim, grid, grid]
    parts = [F.normalize(g.flatten(2), dim=1) for g in groups]
    return torch.cat(parts, dim=1).transpose(1, 2)


class KnnSubModel(SubModel):
    """Training-free: a bounded memory bank of the subset's patch features, nearest-neighbour scoring."""

    kind = "knn"
    WEIGHTS = "bank.safetensors"

    def __init__(self, ctx: Stage1Context, index: int, seed: int, directory: Path) -> None:
        super().__init__(ctx, index, seed, directory)
        self.bank: torch.Tensor | None = None  # [M, 2*dim] on the device
        # Where each bank row came from: (position of its image, patch index). Saved instead of the
        # vectors, which the shared features rebuild exactly.
        self.bank_image = np.zeros(0, np.int64)
        self.bank_patch = np.zeros(0, np.int64)

    def _patches_per_image(self) -> int:
        grid = self.ctx.encoder.grid
        return grid * grid

    def fit(self, positions: np.ndarray, resume: bool) -> dict[str, Any]:  # noqa: ARG002 - nothing to resume
        t0 = time.perf_counter()
        per_image = self._patches_per_image()
        total = len(positions) * per_image
        limit = self.ctx.cfg.llb.knn_bank_size
        if total > limit:
            flat = np.sort(np.random.default_rng(self.seed).choice(total, size=limit, replace=False))
        else:
            flat = np.arange(total)
        self.bank_image = np.asarray(positions, np.int64)[flat // per_image]
        self.bank_patch = (flat % per_image).astype(np.int64)
        self._build_bank()
        return {"bank_size": int(len(flat)), "subset_patches": int(total), "seconds": time.perf_counter() - t0}

    def _build_bank(self, chunk: int = 32) -> None:
        images = np.unique(self.bank_image)
        bank = None
        for start in range(0, len(images), chunk):
            part = images[start : start + chunk]
            vectors = patch_vectors(self.ctx.features, part)
            if bank is None:
                bank = torch.empty((len(self.bank_image), vectors.shape[-1]), device=vectors.device)
            rows = np.flatnonzero((self.bank_image >= part[0]) & (self.bank_image <= part[-1]))
            local = np.searchsorted(part, self.bank_image[rows])
            bank[torch.as_tensor(rows, device=bank.device)] = vectors[local, self.bank_patch[rows]]
        self.bank = bank
        self._bank_image_t = torch.as_tensor(self.bank_image, device=self.ctx.device)
        # Leave-one-image-out only makes sense when the bank holds more than one image.
        self._leave_one_out = len(images) > 1

    @torch.no_grad()
    def patch_distances(self, positions: np.ndarray) -> torch.Tensor:
        """[B, patches]: each patch's distance to its nearest bank patch, chunked to bound memory."""
        assert self.bank is not None, "fit() or load() first"
        per_image = self._patches_per_image()
        images_per_chunk = max(1, CDIST_ELEMENTS // (len(self.bank) * per_image))
        out = []
        for start in range(0, len(positions), images_per_chunk):
            part = np.asarray(positions[start : start + images_per_chunk], np.int64)
            query = patch_vectors(self.ctx.features, part).reshape(-1, self.bank.shape[1])
            # cdist's matmul form: ~1e-5 absolute rounding for near-identical vectors, far below
            # the gaps between image scores, and much faster than the exact elementwise form.
            distance = torch.cdist(query, self.bank)  # [B*patches, M]
            if self._leave_one_out:
                owner = torch.as_tensor(part, device=distance.device).repeat_interleave(per_image)
                distance.masked_fill_(owner[:, None] == self._bank_image_t[None, :], math.inf)
            out.append(distance.amin(dim=1).view(len(part), per_image))
        return torch.cat(out) if out else torch.zeros((0, per_image), device=self.ctx.device)

    def score(self, positions: np.ndarray) -> np.ndarray:
        return self.patch_distances(positions).amax(dim=1).float().cpu().numpy()

    def patch_scores(self, positions: np.ndarray) -> np.ndarray:
        grid = self.ctx.encoder.grid
        return self.patch_distances(positions).view(len(positions), grid, grid).float().cpu().numpy()

    def anomaly_maps(self, positions: np.ndarray) -> np.ndarray:
        grid, size = self.ctx.encoder.grid, self.ctx.scorer.map_size
        distances = self.patch_distances(positions).view(len(positions), 1, grid, grid)
        maps = F.interpolate(distances, size=(size, size), mode="bilinear", align_corners=True)
        return maps[:, 0].float().cpu().numpy()

    def save(self) -> None:
        save_file({"bank_image": torch.from_numpy(self.bank_image), "bank_patch": torch.from_numpy(self.bank_patch)},
                  str(self.directory / self.WEIGHTS))

    def load(self) -> None:
        tensors = load_file(str(self.directory / self.WEIGHTS))
        self.bank_image = tensors["bank_image"].numpy()
        self.bank_patch = tensors["bank_patch"].numpy()
        self._build_bank()


SUBMODELS: dict[str, type[SubModel]] = {"dinomaly": DinomalySubModel, "knn": KnnSubModel}


def create_submodel(ctx: Stage1Context, index: int, seed: int, directory: Path) -> SubModel:
    kind = ctx.cfg.llb.submodel
    if kind not in SUBMODELS:
        raise ValueError(f"unknown llb.submodel {kind!r}; known: {', '.join(sorted(SUBMODELS))}")
    return SUBMODELS[kind](ctx, index, seed, directory)


# ---------------------------------------------------------------------------- concurrent training


def training_bytes_estimate(ctx: Stage1Context) -> int:
    """Rough GPU memory one Dinomaly sub-model needs while training (a heuristic, not a measurement).

    Weights, gradients and three AMSGrad moments (5 x 4 bytes per parameter; the decoder has about
    104 * dim^2 parameters), plus activations saved for backward, counted as ~24 floats per token
    and channel per decoder block (qkv, attention terms, two norms, the 4x MLP).
    """
    dim = ctx.encoder.embed_dim
    tokens = ctx.encoder.grid**2 + ctx.encoder.num_prefix_tokens
    params = 104 * dim * dim
    activations = ctx.cfg.train.batch_size * tokens * dim * 24 * 8
    bytes_per_float = 2 if ctx.cfg.train.precision == "bf16" else 4
    return params * 4 * 5 + activations * bytes_per_float


def concurrent_workers(ctx: Stage1Context, pending: int) -> int:
    """How many Dinomaly sub-models to train at once on this process's GPU.

    ``llb.concurrent_submodels``: 1 (default) trains them one after the other, the tested,
    bit-reproducible path; 0 = as many as fit in 80% of the free GPU memory; N = at most N.
    Concurrency is CUDA-only and Dinomaly-only (knn sub-models are a few matmuls each).
    """
    requested = int(getattr(ctx.cfg.llb, "concurrent_submodels", 1))
    if requested == 1 or pending <= 1 or ctx.device.type != "cuda" or ctx.cfg.llb.submodel != "dinomaly":
        return 1
    free, _ = torch.cuda.mem_get_info(ctx.device)
    fit = max(1, int(0.8 * free) // training_bytes_estimate(ctx))
    return max(1, min(pending, fit if requested == 0 else min(requested, fit)))


def run_on_streams(jobs: Sequence[Callable[[], T]], workers: int, device: torch.device) -> list[T]:
    """Run ``jobs`` in order, or ``workers`` at a time, each thread on its own CUDA stream.

    GPU path, untested in CI (written against torch.cuda's documented API): the current stream and
    device are thread-local in PyTorch, so each worker thread issues its sub-model's kernels on a
    private stream and the GPU overlaps them; host syncs in one sub-model's step (``.item()`` in
    the optimiser and the loss logging) then stall only that thread. Dropout draws from the shared
    CUDA generator in whatever order the threads reach it, so concurrent sub-models are seeded but
    not bit-reproducible; ``llb.concurrent_submodels=1`` is.
    """
    if workers <= 1 or device.type != "cuda":
        return [job() for job in jobs]
    torch.cuda.synchronize(device)  # the feature cache was written on the default stream

    def on_own_stream(job: Callable[[], T]) -> T:
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                result = job()
            stream.synchronize()
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(on_own_stream, jobs))
