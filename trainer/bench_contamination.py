"""`llb-edge bench contamination`: how much LLB screening buys as the training set gets dirtier.

For each contamination level alpha:

- the training set: Real-IAD uses the official FUIAD split JSONs (``realiad_jsons_fuiad_<alpha>``,
  contamination already in the train list); every other dataset gets the synthetic protocol of
  method.md section 7 (``contaminate``: int(alpha * |train|) defective test images moved into
  train and removed from test, seeded by ``data.split_seed``);
- variants, all trained and evaluated on the same contaminated split: ``none`` (stage 2 on the
  whole training set), ``dinomaly`` (LLB with Dinomaly sub-models), ``knn`` (LLB with the
  training-free knn sub-model); each reports I-AUROC, P-AUROC, AUPRO on the test split and the
  anomaly fraction of the set the final model was trained on (D_pure, or all of train);
- the k ablation (paper Figure 4) at ``ablation_alphas``: for k in ``ks``, how many normal and
  anomalous images D_pure keeps when selected by the consensus of k sub-models and by each single
  sub-model alone.

The training images' encoder features are computed once per alpha and shared by every variant and
every ablation run (same contaminated train set, same features). Each finished piece leaves a
``result.json`` (and stage-1 sub-models their ``scores.json``), so an interrupted bench run picks up
where it stopped when called again with the same ``out_dir``.

Outputs in ``out_dir``: ``contamination.md`` (the tables), ``results.json``, ``metrics_vs_alpha.png``,
``dpure_anomaly_fraction.png``, ``k_ablation.png``, and one folder per alpha with the runs.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from llb_edge import runs
from llb_edge.config import RunConfig
from llb_edge.data.images import validate_split
from llb_edge.data.readers import load_contaminated
from llb_edge.data.samples import ANOMALOUS, DatasetSplit, Sample
from llb_edge.data.transforms import Geometry
from llb_edge.models.dinomaly import DinoEncoder, Dinomaly, InspectionModel, create_dinomaly, encoder_spec
from llb_edge.trainer.evaluate import evaluate
from llb_edge.trainer.features import EncodedImages, load_model_inputs
from llb_edge.trainer.llb import keep_count, screen, select_lowest
from llb_edge.trainer.pipeline import make_scorer
from llb_edge.trainer.train import train_dinomaly

log = logging.getLogger(__name__)

VARIANTS = ("none", "dinomaly", "knn")
DEFAULT_ALPHAS = (0.0, 0.1, 0.2, 0.4)
DEFAULT_KS = (1, 3, 5, 7)
METRICS = (("i_auroc", "I-AUROC"), ("p_auroc", "P-AUROC"), ("aupro", "AUPRO"))


# --------------------------------------------------------------------------------- training sets


def anomalies(samples: list[Sample]) -> int:
    return sum(s.label == ANOMALOUS for s in samples)


# ---------------------------------------------------------------------------------------- runs


def train_and_evaluate(
    cfg: RunConfig, encoder: DinoEncoder, features: EncodedImages, split: DatasetSplit, positions: np.ndarray,
    run_dir: Path, device: torch.device,
) -> dict[str, float]:
    """Stage 2 on ``positions`` of the shared features, then the test-split metrics."""
    torch.manual_seed(cfg.train.seed)
    final = Dinomaly(encoder, encoder_spec(cfg.model.encoder).num_heads, cfg.model.dropout).to(device)
    train_dinomaly(final, features, positions, cfg.train, cfg.train.iterations, cfg.train.seed,
                   checkpoint=run_dir / runs.CHECKPOINT, resume=True, log_path=run_dir / "train_log.jsonl",
                   desc=f"stage 2 ({run_dir.parent.name}/{run_dir.name})")
    inspection = InspectionModel(final, make_scorer(cfg)).to(device).eval()
    metrics = evaluate(inspection, split.test, Geometry(cfg.data.resize, cfg.data.crop), cfg.eval, device)
    (run_dir / runs.CHECKPOINT).unlink(missing_ok=True)  # the bench keeps metrics, not models
    return metrics


def run_variant(
    cfg: RunConfig, variant: str, alpha: float, split: DatasetSplit, encoder: DinoEncoder,
    features: EncodedImages, run_dir: Path, device: torch.device,
) -> dict[str, Any]:
    """One (alpha, variant) cell of the table; read back from result.json when already done."""
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    positions = np.arange(len(split.train))
    screening: dict[str, Any] = {}
    if variant != "none":
        vcfg = copy.deepcopy(cfg)
        vcfg.llb.submodel = variant
        result = screen(vcfg, encoder, features, split.train, run_dir / "stage1", True, make_scorer(cfg))
        positions, screening = result.kept_positions, result.summary
    trained_on = [split.train[i] for i in positions]
    metrics = train_and_evaluate(cfg, encoder, features, split, positions, run_dir, device)
    record = {
        "alpha": alpha, "variant": variant,
        "train": len(split.train), "train_anomalies": anomalies(split.train),
        "trained_on": len(trained_on), "trained_on_anomalies": anomalies(trained_on),
        "anomaly_fraction": anomalies(trained_on) / len(trained_on),
        "metrics": metrics, "screening": screening, "seconds": time.perf_counter() - t0,
    }
    runs.write_json(done, record)
    return record


def kept_counts(samples: list[Sample], kept: list[str]) -> tuple[int, int]:
    """(normal, anomalous) among the kept paths."""
    anomalous = {s.path for s in samples if s.label == ANOMALOUS}
    n_anomalous = sum(p in anomalous for p in kept)
    return len(kept) - n_anomalous, n_anomalous


def k_ablation_row(
    cfg: RunConfig, k: int, alpha: float, split: DatasetSplit, encoder: DinoEncoder, features: EncodedImages,
    stage_dir: Path, submodel: str,
) -> dict[str, Any]:
    """Normal/anomalous images kept with k sub-models: by their consensus and by each one alone."""
    kcfg = copy.deepcopy(cfg)
    kcfg.llb.k, kcfg.llb.submodel = k, submodel
    result = screen(kcfg, encoder, features, split.train, stage_dir, True, make_scorer(cfg))
    count = keep_count(len(split.train), cfg.llb.keep)
    singles = [kept_counts(split.train, select_lowest(result.table.single(j), count)) for j in range(k)]
    normal, anomalous = kept_counts(split.train, result.kept)
    return {
        "alpha": alpha, "k": k, "submodel": submodel, "kept": count,
        "train": len(split.train), "train_anomalies": anomalies(split.train),
        "normal_kept": normal, "anomalous_kept": anomalous,
        "single_normal_kept": [s[0] for s in singles], "single_anomalous_kept": [s[1] for s in singles],
    }


# ------------------------------------------------------------------------------------- reporting


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def spread(values: list[int]) -> str:
    return f"{np.mean(values):.1f} [{min(values)}-{max(values)}]"


def write_markdown(path: Path, cfg: RunConfig, cells: list[dict], ablation: list[dict], meta: dict) -> None:
    synthetic = cfg.data.dataset != "realiad"
    lines = [
        "# Contamination benchmark",
        "",
        f"- dataset: {cfg.data.dataset} ({cfg.data.root}{', ' + cfg.data.category if cfg.data.category else ''}); "
        + ("synthetic contamination: int(alpha x |train|) defective test images moved into train and removed "
           f"from test (seed {cfg.data.split_seed})" if synthetic else "official FUIAD split JSONs per alpha"),
        f"- encoder {cfg.model.encoder}, weights {cfg.model.weights}, input {cfg.data.resize}->{cfg.data.crop} px",
        f"- stage 2: {cfg.train.iterations} iterations, batch {cfg.train.batch_size}, {cfg.train.precision}; "
        f"stage 1: k = {cfg.llb.k}, keep t = {cfg.llb.keep:g}, Dinomaly sub-models {cfg.llb.submodel_iterations} "
        f"iterations, knn bank <= {cfg.llb.knn_bank_size} patches, llb.seed {cfg.llb.seed}",
        f"- device {meta['device']}, wall time {meta['seconds'] / 60:.1f} min; invoked as `{meta['command']}`",
        "",
        "## Test metrics per contamination level",
        "",
        "D_pure: the set the final model was trained on (all of train for `none`).",
        "",
        "| alpha | variant | train (anomalous) | D_pure | anomalous in D_pure | I-AUROC | P-AUROC | AUPRO |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        m = c["metrics"]
        lines.append(
            f"| {c['alpha']:g} | {c['variant']} | {c['train']} ({c['train_anomalies']}) | {c['trained_on']} | "
            f"{c['trained_on_anomalies']} ({c['anomaly_fraction']:.1%}) | {fmt(m.get('i_auroc'))} | "
            f"{fmt(m.get('p_auroc'))} | {fmt(m.get('aupro'))} |"
        )
    if ablation:
        lines += [
            "",
            "## k ablation (paper Figure 4)",
            "",
            "Images kept in D_pure (floor(N x t)) when selected by the consensus of k sub-models, and by each "
            "single sub-model's scores alone (mean [min-max] over the k sub-models).",
            "",
            "| alpha | k | sub-model | D_pure | normal kept (consensus) | anomalous kept (consensus) | "
            "normal kept (single) | anomalous kept (single) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in ablation:
            lines.append(
                f"| {r['alpha']:g} | {r['k']} | {r['submodel']} | {r['kept']} | {r['normal_kept']} | "
                f"{r['anomalous_kept']} | {spread(r['single_normal_kept'])} | {spread(r['single_anomalous_kept'])} |"
            )
    path.write_text("\n".join(lines) + "\n")


def plot_metrics(path: Path, cells: list[dict]) -> None:
    fig = Figure(figsize=(12, 3.4), dpi=110)
    variants = sorted({c["variant"] for c in cells}, key=lambda v: VARIANTS.index(v) if v in VARIANTS else 9)
    for i, (key, title) in enumerate(METRICS):
        ax = fig.add_subplot(1, len(METRICS), i + 1)
        for variant in variants:
            points = [(c["alpha"], c["metrics"][key]) for c in cells if c["variant"] == variant and key in c["metrics"]]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=variant)
        ax.set_title(title)
        ax.set_xlabel("alpha")
        ax.grid(alpha=0.3)
    fig.axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_fractions(path: Path, cells: list[dict]) -> None:
    fig = Figure(figsize=(5.5, 3.6), dpi=110)
    ax = fig.add_subplot()
    for variant in sorted({c["variant"] for c in cells}):
        points = [(c["alpha"], c["anomaly_fraction"]) for c in cells if c["variant"] == variant]
        label = "none (= train)" if variant == "none" else variant
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xlabel("alpha")
    ax.set_ylabel("anomaly fraction of D_pure")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_ablation(path: Path, ablation: list[dict]) -> None:
    alphas = sorted({r["alpha"] for r in ablation})
    fig = Figure(figsize=(10, 3.4 * len(alphas)), dpi=110)
    for row, alpha in enumerate(alphas):
        rows = [r for r in ablation if r["alpha"] == alpha]
        for col, kind in enumerate(("normal", "anomalous")):
            ax = fig.add_subplot(len(alphas), 2, 2 * row + col + 1)
            ks = [r["k"] for r in rows]
            ax.bar(ks, [r[f"{kind}_kept"] for r in rows], width=0.8, color="tab:green", alpha=0.6, label="consensus")
            for r in rows:
                singles = r[f"single_{kind}_kept"]
                ax.scatter([r["k"]] * len(singles), singles, color="black", s=12, zorder=3,
                           label="single sub-models" if r is rows[0] else None)
            ax.set_xticks(ks)
            ax.set_xlabel("k")
            ax.set_title(f"{kind} images kept, alpha {alpha:g}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------------- bench


def run_contamination_bench(
    cfg: RunConfig,
    alphas: list[float] | tuple[float, ...] = DEFAULT_ALPHAS,
    ks: list[int] | tuple[int, ...] = DEFAULT_KS,
    out_dir: Path = Path("bench_out/contamination"),
    variants: list[str] | tuple[str, ...] = VARIANTS,
    ablation_alphas: list[float] | None = None,
    ablation_submodel: str = "dinomaly",
) -> Path:
    """Run the benchmark into ``out_dir`` (resumable); returns the path of the Markdown table.

    ``ablation_alphas``: where to run the k ablation; default: the largest alpha > 0 in ``alphas``
    (one level bounds its cost: sum(ks) sub-model trainings); [] skips it, as does ks = [].
    """
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    positive = [a for a in alphas if a > 0]
    if ablation_alphas is None:
        ablation_alphas = [max(positive)] if positive else []
    if not ks:
        ablation_alphas = []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    device = runs.resolve_device(cfg.train.device)
    geometry = Geometry(cfg.data.resize, cfg.data.crop)
    torch.manual_seed(cfg.train.seed)
    model, _ = create_dinomaly(cfg.model.encoder, cfg.data.crop, cfg.model.weights, cfg.model.dropout)
    model.to(device)
    encoder = model.encoder

    cells: list[dict] = []
    ablation: list[dict] = []
    for alpha in sorted(set(alphas) | set(ablation_alphas)):
        split = validate_split(load_contaminated(cfg.data, alpha, cfg.data.split_seed), cfg.data.on_bad_file)
        log.info("alpha %g: %s", alpha, split.summary())
        alpha_dir = out_dir / f"alpha_{alpha:g}"
        # One feature cache per contaminated training set, shared by all its variants and k runs.
        images = load_model_inputs(split.train, geometry, desc=f"loading train images (alpha {alpha:g})")
        features = EncodedImages.from_config(model, images, device, cfg.train, spill_dir=alpha_dir)
        if alpha in alphas:
            for variant in variants:
                cells.append(run_variant(cfg, variant, alpha, split, encoder, features, alpha_dir / variant, device))
        if alpha in ablation_alphas:
            for k in ks:
                stage_dir = alpha_dir / f"ablation_k{k}"
                if k == cfg.llb.k and ablation_submodel in variants and alpha in alphas:
                    stage_dir = alpha_dir / ablation_submodel / "stage1"  # same screening: reuse it
                ablation.append(k_ablation_row(cfg, k, alpha, split, encoder, features, stage_dir, ablation_submodel))
        del features, images
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    meta = {"device": str(device), "seconds": time.perf_counter() - t0, "command": " ".join(sys.argv)}
    runs.write_json(out_dir / "results.json", {"meta": meta, "cells": cells, "k_ablation": ablation})
    if cells:
        plot_metrics(out_dir / "metrics_vs_alpha.png", cells)
        plot_fractions(out_dir / "dpure_anomaly_fraction.png", cells)
    if ablation:
        plot_ablation(out_dir / "k_ablation.png", ablation)
    markdown = out_dir / "contamination.md"
    write_markdown(markdown, cfg, cells, ablation, meta)
    return markdown
