"""`llb-edge train` end to end: data -> (LLB stage 1) -> stage 2 -> run directory -> evaluation."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from llb_edge import runs
from llb_edge.config import RunConfig, TrainConfig, write_config
from llb_edge.data.images import validate_split
from llb_edge.data.readers import load_configured_split
from llb_edge.data.samples import DatasetSplit, Sample, save_sample_list
from llb_edge.data.transforms import Geometry
from llb_edge.models.dinomaly import (
    AnomalyScorer,
    DinoEncoder,
    Dinomaly,
    InspectionModel,
    create_dinomaly,
    encoder_spec,
)
from llb_edge.trainer.evaluate import evaluate, score_encoded
from llb_edge.trainer.features import EncodedImages, load_model_inputs
from llb_edge.trainer.train import TrainResult, train_dinomaly

log = logging.getLogger(__name__)

CALIBRATION_SEED_STREAM = 0xCA1  # keeps the calibration draw independent of every other use of train.seed


def make_scorer(cfg: RunConfig) -> AnomalyScorer:
    e = cfg.eval
    return AnomalyScorer(cfg.data.crop, e.map_size, e.gaussian_sigma, e.gaussian_kernel, e.top_fraction)


def prepare_run_dir(cfg: RunConfig, resume: bool) -> Path:
    run_dir = cfg.run_dir
    if (run_dir / runs.CONFIG).exists() and not resume:
        raise runs.RunError(
            f"run directory {run_dir} already holds a run; continue it with --resume, "
            "or choose another name with --name"
        )
    if resume and (run_dir / runs.METADATA).exists() and not (run_dir / runs.CHECKPOINT).exists():
        # A completed run deleted its checkpoint (the last step): resuming would train stage 2 afresh.
        raise runs.RunError(f"run {run_dir} is complete: nothing to resume (`llb-edge eval {run_dir}` "
                            "evaluates it again)")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, run_dir / runs.CONFIG)
    return run_dir


def score_stats(scores: np.ndarray) -> dict[str, float]:
    """Distribution of the final model's scores on its own training images (threshold calibration)."""
    quantiles = {f"q{q:g}": float(np.quantile(scores, q / 100)) for q in (50, 90, 95, 99, 99.5, 100)}
    return {"count": int(len(scores)), "mean": float(scores.mean()), "std": float(scores.std()), **quantiles}


def calibration_count(kept: int, fraction: float, minimum: int) -> int:
    """How many kept images are held back for calibration: fraction of them, at least minimum, at most half."""
    if fraction <= 0 or kept < 2:
        return 0
    return min(max(round(fraction * kept), minimum), kept // 2)


def calibration_split(positions: np.ndarray, train: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(positions kept for training, positions held back to calibrate the threshold), both ascending.

    The held-back slice is drawn with its own seed stream (``train.seed``), so a resumed run holds
    back the same images.
    """
    count = calibration_count(len(positions), train.calibration_fraction, train.calibration_min)
    rng = np.random.default_rng(np.random.SeedSequence([train.seed, CALIBRATION_SEED_STREAM]))
    held = np.zeros(len(positions), dtype=bool)
    held[rng.choice(len(positions), count, replace=False)] = True
    return np.sort(positions[~held]), np.sort(positions[held])


def load_split(cfg: RunConfig) -> DatasetSplit:
    """The train/test split a new run reads, files checked up front, contamination applied when configured.

    Only training reads the dataset; the run records what it read (runs.RunSplit) for the rest.
    """
    return validate_split(load_configured_split(cfg.data), cfg.data.on_bad_file)


def new_final_model(cfg: RunConfig, encoder: DinoEncoder) -> Dinomaly:
    """A fresh stage-2 model (bottleneck + decoder) on the shared frozen encoder."""
    return Dinomaly(encoder, encoder_spec(cfg.model.encoder).num_heads, cfg.model.dropout)


def train_stage2(
    cfg: RunConfig, final: Dinomaly, features: EncodedImages, positions: np.ndarray, run_dir: Path, resume: bool,
    loss_weights: torch.Tensor | None = None, desc: str = "stage 2",
) -> TrainResult:
    """Stage 2: train ``final`` on ``positions`` of the encoded training images (resumable in ``run_dir``)."""
    return train_dinomaly(final, features, positions, cfg.train, cfg.train.iterations, cfg.train.seed,
                          checkpoint=run_dir / runs.CHECKPOINT, resume=resume, log_path=run_dir / runs.TRAIN_LOG,
                          desc=desc, loss_weights=loss_weights)


def evaluate_model(
    cfg: RunConfig, model: Dinomaly, test: list[Sample], device: torch.device, out_dir: Path | None
) -> dict[str, float]:
    """The test-split metrics of a trained model (per-image scores and overlays into ``out_dir`` when given)."""
    inspection = InspectionModel(model, make_scorer(cfg)).to(device).eval()
    return evaluate(inspection, test, Geometry(cfg.data.resize, cfg.data.crop), cfg.eval, device, out_dir)


def run_training(cfg: RunConfig, resume: bool = False, evaluate_after: bool = True) -> Path:
    """Train a run (resumable) and evaluate it on the test split; returns the run directory."""
    from llb_edge.trainer.llb import is_primary_rank, rank_and_world

    # Under torchrun, stage-1 sub-models are spread over ranks; rank 0 owns the run directory,
    # merges the scores and trains the final model.
    rank, world = rank_and_world()
    run_dir = prepare_run_dir(cfg, resume) if is_primary_rank() else cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    device = runs.resolve_device(cfg.train.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    geometry = Geometry(cfg.data.resize, cfg.data.crop)
    # The model first: a wrong weights file should fail before minutes of image checks.
    torch.manual_seed(cfg.train.seed)
    model, backbone = create_dinomaly(cfg.model.encoder, cfg.data.crop, cfg.model.weights, cfg.model.dropout)
    model.to(device)
    split = load_split(cfg)
    log.info("dataset %s", split.summary())

    images = load_model_inputs(split.train, geometry, desc="loading training images")
    # The calibration slice (docs/bundle.md): "training" holds it back from the whole training set
    # before stage 1 sees it; "kept" from D_pure after screening.
    everything = np.arange(len(split.train))
    pool, held = (calibration_split(everything, cfg.train) if cfg.train.calibration_source == "training"
                  else (everything, everything[:0]))
    samples = [split.train[i] for i in pool]
    t0 = time.perf_counter()
    features = EncodedImages.from_config(model, images if len(held) == 0 else images[pool], device, cfg.train,
                                         spill_dir=run_dir)
    encode_seconds = time.perf_counter() - t0

    stages = {s.strip() for s in cfg.llb.stages.split(",")}
    kept = np.arange(len(samples))
    screening: dict = {}
    loss_weights = None
    if "1" in stages:
        from llb_edge.trainer.llb import run_stage1

        stage1 = run_stage1(cfg, model.encoder, features, samples, run_dir, resume, make_scorer(cfg))
        if not is_primary_rank():
            return run_dir
        kept, screening, loss_weights = stage1.kept_positions, stage1.summary, stage1.loss_weights
        below_cut = set(stage1.kept)
    else:
        below_cut = {sample.path for sample in samples}
    if cfg.train.calibration_source == "kept":
        # Drawn from the images below the cut: a suspect (masked or dropped) never calibrates.
        eligible = np.asarray([i for i in kept if samples[i].path in below_cut], dtype=np.int64)
        _, held_kept = calibration_split(eligible, cfg.train)
        kept = np.setdiff1d(kept, held_kept)
        calibration_samples = [samples[i] for i in held_kept]
    else:
        calibration_samples = [split.train[i] for i in held]
    train_samples = [samples[i] for i in kept]
    save_sample_list(train_samples, run_dir / runs.TRAIN_LIST)
    runs.write_split(run_dir, runs.RunSplit(split.name, split.train, split.test, calibration_samples))

    final = model if "1" not in stages else new_final_model(cfg, model.encoder)
    result = train_stage2(cfg, final, features, kept, run_dir, resume, loss_weights)
    save_file({k: v.detach().cpu().contiguous() for k, v in final.trainable_state_dict().items()},
              str(run_dir / runs.MODEL))
    scorer = make_scorer(cfg).to(device)
    train_scores, _ = score_encoded(final, scorer, features, kept)
    runs.write_json(run_dir / runs.TRAIN_SCORES, {"stats": score_stats(train_scores),
                                                  "scores": {s.path: float(v) for s, v in
                                                             zip(train_samples, train_scores, strict=True)}})
    if calibration_samples:
        if cfg.train.calibration_source == "kept":
            calibration_features, positions = features, held_kept
        else:
            calibration_features = EncodedImages.from_config(model, images[held], device, cfg.train, spill_dir=run_dir)
            positions = np.arange(len(held))
        calibration_scores, _ = score_encoded(final, scorer, calibration_features, positions)
        runs.write_json(run_dir / runs.CALIBRATION_SCORES, {
            "source": cfg.train.calibration_source,
            "stats": score_stats(calibration_scores),
            "scores": {s.path: float(v) for s, v in zip(calibration_samples, calibration_scores, strict=True)},
        })
    runs.write_metadata(run_dir, runs.RunMetadata(
        encoder=cfg.model.encoder,
        backbone=runs.BackboneRecord(**backbone),
        input=runs.InputSize(resize=cfg.data.resize, crop=cfg.data.crop),
        iterations=cfg.train.iterations,
        batch_size=cfg.train.batch_size,
        device=str(device),
        precision=cfg.train.precision,
        train_images=len(train_samples),
        dataset=runs.DatasetSizes(name=split.name, train=len(split.train), test=len(split.test)),
        stages=sorted(stages),
        screening=screening,
        timing=runs.TrainTiming(encode_seconds=encode_seconds, train_seconds=result.seconds,
                                train_images_per_second=result.images_per_second),
        final_loss=result.final_loss,
        calibration_images=len(calibration_samples),
        calibration_source=cfg.train.calibration_source,
    ))
    if evaluate_after and split.test:
        runs.write_json(run_dir / runs.METRICS, evaluate_model(cfg, final, split.test, device, run_dir))
    # Complete: drop what only a resume needed (docs/runs.md). The checkpoint goes first, as its
    # absence is what marks the run complete.
    (run_dir / runs.CHECKPOINT).unlink(missing_ok=True)
    if "1" in stages and not cfg.llb.keep_submodel_weights:
        from llb_edge.trainer.llb import discard_submodel_weights

        discard_submodel_weights(run_dir, cfg)
    return run_dir


def run_evaluation(
    run_dir: Path, device: str = "auto", weights: str | None = None, precision: str = "fp32"
) -> dict[str, float]:
    """`llb-edge eval`: re-evaluate a finished run on its recorded test split (fp32, or under bf16 autocast).

    fp32 results go to metrics.json; bf16 results to metrics_bf16.json, so both can be compared.
    """
    target = runs.resolve_device(device)
    inspection, cfg, _ = runs.load_inspection_model(run_dir, str(target), weights)
    test = runs.read_split(run_dir).test
    geometry = Geometry(cfg.data.resize, cfg.data.crop)
    with torch.autocast(target.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        metrics = evaluate(inspection, test, geometry, cfg.eval, target, run_dir if precision == "fp32" else None)
    runs.write_json(run_dir / runs.metrics_name(precision), metrics)
    return metrics
