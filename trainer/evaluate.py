"""Scoring and evaluation: image scores, method.md section 6 metrics, and overlay PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from llb_edge import runs
from llb_edge.config import EvalConfig
from llb_edge.data.images import read_image_rgb, read_mask
from llb_edge.data.samples import Sample
from llb_edge.data.transforms import Geometry
from llb_edge.metrics import PixelMetrics, image_metrics
from llb_edge.models.dinomaly import AnomalyScorer, Dinomaly, InspectionModel
from llb_edge.trainer.features import EncodedImages


@torch.no_grad()
def score_encoded(
    model: Dinomaly, scorer: AnomalyScorer, features: EncodedImages, indices: np.ndarray, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores (top-fraction mean) and max of the images at ``indices``, from their features."""
    model.eval()
    scores, maxes = [], []
    for start in range(0, len(indices), batch_size):
        batch = features.batch(indices[start : start + batch_size])
        _, score, peak = scorer(batch.groups, model.decode(batch.fused))
        scores.append(score.float().cpu().numpy())
        maxes.append(peak.float().cpu().numpy())
    if not scores:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(scores), np.concatenate(maxes)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None, vmax: float) -> np.ndarray:
    """BGR panel: the model input, its heat map blended over it, ground-truth outline in green."""
    size = image.shape[0]
    heat = cv2.resize(anomaly_map, (size, size), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.clip(heat / max(vmax, 1e-12) * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    blended = cv2.addWeighted(bgr, 0.5, heat, 0.5, 0)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(blended, contours, -1, (0, 255, 0), 1)
    return np.concatenate([bgr, blended], axis=1)


def overlay_indices(labels: np.ndarray, count: int) -> set[int]:
    """An even spread of anomalous and normal test images, deterministic."""
    chosen: set[int] = set()
    for wanted in (1, 0):
        pool = np.flatnonzero(labels == wanted)
        take = min(len(pool), count - count // 2 if wanted == 1 else count // 2)
        if take:
            chosen.update(pool[np.linspace(0, len(pool) - 1, take).astype(int)].tolist())
    return chosen


@torch.no_grad()
def evaluate(
    model: InspectionModel,
    samples: list[Sample],
    geometry: Geometry,
    cfg: EvalConfig,
    device: torch.device,
    out_dir: Path | None = None,
) -> dict[str, float]:
    """Run the deployable graph on test images; write scores, metrics and overlays into ``out_dir``."""
    labels = np.asarray([s.label for s in samples])
    with_pixels = any(s.mask_path for s in samples)
    pixels = PixelMetrics()
    scores, maxes = np.zeros(len(samples), np.float32), np.zeros(len(samples), np.float32)
    wanted_overlays = overlay_indices(labels, cfg.overlays) if out_dir else set()
    panels: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    map_size = model.scorer.map_size
    for start in tqdm(range(0, len(samples), cfg.batch_size), desc="evaluate", unit="batch", leave=False):
        chunk = samples[start : start + cfg.batch_size]
        images, masks = [], []
        for sample in chunk:
            rgb = read_image_rgb(sample.path)
            images.append(geometry.to_model_input(rgb))
            crop_mask = geometry.mask_to_model(read_mask(sample.mask_path, *rgb.shape[:2]))
            masks.append(cv2.resize(crop_mask.astype(np.uint8), (map_size, map_size),
                                    interpolation=cv2.INTER_NEAREST).astype(bool))
        maps, score, peak = model(torch.from_numpy(np.stack(images)).to(device))
        maps = maps[:, 0].float().cpu().numpy()
        scores[start : start + len(chunk)] = score.float().cpu().numpy()
        maxes[start : start + len(chunk)] = peak.float().cpu().numpy()
        if with_pixels:
            pixels.update(maps, np.stack(masks))
        for offset in range(len(chunk)):
            if start + offset in wanted_overlays:
                panels[start + offset] = (images[offset], maps[offset], masks[offset])

    metrics: dict[str, float] = {"test_images": len(samples), "test_anomalous": int((labels == 1).sum())}
    if 0 < (labels == 1).sum() < len(labels):
        metrics.update(image_metrics(scores, labels))
        metrics["i_auroc_max"] = image_metrics(maxes, labels)["i_auroc"]
    if with_pixels:
        metrics.update(pixels.compute())
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / runs.TEST_SCORES, "w") as handle:
            for sample, score, peak in zip(samples, scores, maxes, strict=True):
                handle.write(json.dumps({"path": sample.path, "label": sample.label, "score": float(score),
                                         "max": float(peak)}) + "\n")
        if panels:
            overlay_dir = out_dir / runs.OVERLAYS
            overlay_dir.mkdir(exist_ok=True)
            vmax = max(float(m.max()) for _, m, _ in panels.values())
            for index, (image, anomaly_map, mask) in panels.items():
                name = f"{index:04d}_{'ng' if labels[index] == 1 else 'ok'}_{scores[index]:.4f}.png"
                cv2.imwrite(str(overlay_dir / name), overlay(image, anomaly_map, mask, vmax))
    return metrics
