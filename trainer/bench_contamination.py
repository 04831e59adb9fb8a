"""`llb-edge bench contamination`: how much LLB screening buys as the training set gets dirtier.

For each seed and contamination level alpha:

- the training set: Real-IAD uses the official FUIAD split JSONs (``realiad_jsons_fuiad_<alpha>``,
  contamination already in the train list); every other dataset gets the synthetic protocol of
  method.md section 7 (``contaminate``: int(alpha * |train|) defective test images moved into
  train and removed from test, seeded by the seed, which also seeds stage 1 and stage 2);
- variants, all trained and evaluated on the same contaminated split (``VARIANTS``): ``none``
  (stage 2 on the whole training set), ``default`` (LLB as configured: the product default unless
  ``--set llb.*`` changes it), ``fixed`` (the paper's cut: keep 0.4, drop the rest, same
  sub-model), ``paper`` (keep 0.4 with Dinomaly sub-models), ``dinomaly`` / ``knn`` (the configured
  cut with that sub-model), ``oracle`` (stage 2 on the normal images alone, from the planted
  labels: what perfect screening would reach, the ceiling for any screen); each reports I-AUROC,
  P-AUROC, AUPRO on the test split and how well stage 1 ranked the planted defects (AUROC of the
  consensus score against the planted labels, normal and anomalous images below the cut);
- the k ablation (paper Figure 4) at ``ablation_alphas`` for the first seed: for k in ``ks``, how
  many normal and anomalous images the lowest-scored fraction keeps when selected by the consensus
  of k sub-models and by each single sub-model alone.

The tables give mean and sample standard deviation over the seeds for every cell.

The training images' encoder features are computed once per (seed, alpha) and shared by every
variant. Each finished piece leaves a ``result.json`` (and stage-1 sub-models their
``scores.json``), so an interrupted bench run picks up where it stopped when called again with the
same ``out_dir``.

Outputs in ``out_dir``: ``contamination.md`` (the tables), ``results.json``, ``metrics_vs_alpha.png``,
``dpure_anomaly_fraction.png``, ``k_ablation.png``, and one folder per seed and alpha with the runs.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from llb_edge import runs
from llb_edge.config import PAPER_KEEP, RunConfig
from llb_edge.data.images import validate_split
from llb_edge.data.readers import load_contaminated
from llb_edge.data.samples import ANOMALOUS, DatasetSplit, Sample
from llb_edge.data.transforms import Geometry
from llb_edge.models.dinomaly import DinoEncoder, create_dinomaly
from llb_edge.trainer.features import EncodedImages, load_model_inputs
from llb_edge.trainer.llb import keep_count, screen, select_lowest
from llb_edge.trainer.pipeline import evaluate_model, make_scorer, new_final_model, train_stage2

log = logging.getLogger(__name__)

VARIANTS = ("none", "default", "fixed", "paper", "dinomaly", "knn", "oracle")
DEFAULT_ALPHAS = (0.0, 0.1, 0.2, 0.4)
DEFAULT_KS = (1, 3, 5, 7)
METRICS = (("i_auroc", "I-AUROC"), ("p_auroc", "P-AUROC"), ("aupro", "AUPRO"))


# --------------------------------------------------------------------------------- training sets


def anomalies(samples: list[Sample]) -> int:
    return sum(s.label == ANOMALOUS for s in samples)


# ---------------------------------------------------------------------------------------- runs


def train_and_evaluate(
    cfg: RunConfig, encoder: DinoEncoder, features: EncodedImages, split: DatasetSplit, positions: np.ndarray,
    run_dir: Path, device: torch.device, loss_weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """Stage 2 on ``positions`` of the shared features (the training pipeline's), then the test-split metrics."""
    torch.manual_seed(cfg.train.seed)
    final = new_final_model(cfg, encoder).to(device)
    train_stage2(cfg, final, features, positions, run_dir, resume=True, loss_weights=loss_weights,
                 desc=f"stage 2 ({run_dir.parent.name}/{run_dir.name})")
    metrics = evaluate_model(cfg, final, split.test, device, None)
    (run_dir / runs.CHECKPOINT).unlink(missing_ok=True)  # the bench keeps metrics, not models
    return metrics


def variant_config(cfg: RunConfig, variant: str) -> RunConfig | None:
    """The stage-1 settings of ``variant`` on top of ``cfg``; None for no screening."""
    if variant in ("none", "oracle"):
        return None
    vcfg = copy.deepcopy(cfg)
    if variant in ("fixed", "paper"):
        vcfg.llb.keep, vcfg.llb.above_cut = str(PAPER_KEEP), "drop"
    if variant in ("paper", "dinomaly"):
        vcfg.llb.submodel = "dinomaly"
    if variant == "knn":
        vcfg.llb.submodel = "knn"
    return vcfg


def run_variant(
    cfg: RunConfig, variant: str, alpha: float, split: DatasetSplit, encoder: DinoEncoder,
    features: EncodedImages, run_dir: Path, device: torch.device,
) -> dict[str, Any]:
    """One (seed, alpha, variant) cell; read back from result.json when already done."""
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    if variant == "oracle" and not anomalies(split.train):
        # Nothing planted: the oracle trains on exactly what `none` trains on, with the same seeds.
        record = {**run_variant(cfg, "none", alpha, split, encoder, features, run_dir.parent / "none", device),
                  "variant": "oracle"}
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_json(done, record)
        return record
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    positions = np.arange(len(split.train))
    screening: dict[str, Any] = {}
    loss_weights = None
    below_cut = split.train
    vcfg = variant_config(cfg, variant)
    if variant == "oracle":
        positions = np.asarray([i for i, s in enumerate(split.train) if s.label != ANOMALOUS], dtype=np.int64)
        below_cut = [split.train[i] for i in positions]
    elif vcfg is not None:
        result = screen(vcfg, encoder, features, split.train, run_dir / runs.STAGE1, True, make_scorer(cfg))
        positions, screening, loss_weights = result.kept_positions, result.summary, result.loss_weights
        kept = set(result.kept)
        below_cut = [s for s in split.train if s.path in kept]
        screening = {key: value for key, value in screening.items() if key != "suspects"}
    trained_on = [split.train[i] for i in positions]
    metrics = train_and_evaluate(cfg, encoder, features, split, positions, run_dir, device, loss_weights)
    record = {
        "seed": cfg.train.seed, "alpha": alpha, "variant": variant,
        "train": len(split.train), "train_anomalies": anomalies(split.train),
        "trained_on": len(trained_on), "trained_on_anomalies": anomalies(trained_on),
        "below_cut": len(below_cut), "below_cut_anomalies": anomalies(below_cut),
        "anomaly_fraction": anomalies(below_cut) / len(below_cut),
        "masked_patch_fraction": screening.get("masked_patch_fraction", 0.0),
        "screening_auroc": screening.get("screening_auroc"),
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
    count = keep_count(len(split.train), cfg.llb.keep_fraction or PAPER_KEEP)
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


def mean_std(values: list[float | None], digits: int = 3) -> str:
    """'mean ± sample std' over the seeds (just the value for one seed; '-' when missing)."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{np.mean(present):.{digits}f} ± {np.std(present, ddof=1):.{digits}f}"


def group_cells(cells: list[dict]) -> dict[tuple[float, str], list[dict]]:
    """Cells grouped by (alpha, variant), in alpha then variant order."""
    order = {v: i for i, v in enumerate(VARIANTS)}
    groups: dict[tuple[float, str], list[dict]] = {}
    for c in sorted(cells, key=lambda c: (c["alpha"], order.get(c["variant"], 99), c.get("seed", 0))):
        groups.setdefault((c["alpha"], c["variant"]), []).append(c)
    return groups


def paired_differences(groups: dict[tuple[float, str], list[dict]]) -> dict[tuple[float, str], dict[str, list]]:
    """Per (alpha, variant != none): for each metric, 100 x (variant - none) per seed present in both."""
    out: dict[tuple[float, str], dict[str, list]] = {}
    for (alpha, variant), group in groups.items():
        baseline = {c.get("seed", 0): c for c in groups.get((alpha, "none"), [])}
        pairs = [(c, baseline[c.get("seed", 0)]) for c in group if variant != "none" and c.get("seed", 0) in baseline]
        if pairs:
            out[(alpha, variant)] = {
                key: [100 * (c["metrics"][key] - b["metrics"][key]) if key in c["metrics"] and key in b["metrics"]
                      else None for c, b in pairs]
                for key, _ in METRICS
            }
    return out


def write_markdown(
    path: Path, cfg: RunConfig, seeds: list[int], cells: list[dict], ablation: list[dict], meta: dict
) -> None:
    synthetic = cfg.data.dataset != "realiad"
    llb = cfg.llb
    groups = group_cells(cells)
    lines = [
        "# Contamination benchmark",
        "",
        f"- dataset: {cfg.data.dataset} ({cfg.data.root}{', ' + cfg.data.category if cfg.data.category else ''}); "
        + ("synthetic contamination: int(alpha x |train|) defective test images moved into train and removed "
           "from test" if synthetic else "official FUIAD split JSONs per alpha"),
        f"- seeds {', '.join(map(str, seeds))} (each seeds the split, stage 1 and stage 2); cells: mean ± sample "
        "standard deviation over the seeds",
        f"- encoder {cfg.model.encoder}, weights {cfg.model.weights}, input {cfg.data.resize}->{cfg.data.crop} px",
        f"- stage 2: {cfg.train.iterations} iterations, batch {cfg.train.batch_size}, {cfg.train.precision}; "
        f"stage 1 (default variant): k = {llb.k}, {llb.submodel} sub-models, keep {llb.keep} "
        f"(outlier z {llb.outlier_z:g}), above the cut: {llb.above_cut}; Dinomaly sub-models "
        f"{llb.submodel_iterations} iterations, knn bank <= {llb.knn_bank_size} patches; fixed/paper: keep "
        f"{PAPER_KEEP:g}, drop",
        f"- device {meta['device']}, wall time {meta['seconds'] / 60:.1f} min; invoked as `{meta['command']}`",
        "",
        "## Test metrics per contamination level",
        "",
        "trained on: images stage 2 trained on (anomalous among them); for `mask`, suspects stay in with their "
        "suspect patches left out of the loss (masked: share of all training patches).",
        "",
        "| alpha | variant | seeds | train (anomalous) | trained on (anomalous) | masked | I-AUROC | P-AUROC | AUPRO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (alpha, variant), group in groups.items():
        first = group[0]
        lines.append(
            f"| {alpha:g} | {variant} | {len(group)} | {first['train']} ({first['train_anomalies']}) | "
            f"{np.mean([c['trained_on'] for c in group]):.0f} "
            f"({np.mean([c['trained_on_anomalies'] for c in group]):.1f}) | "
            f"{np.mean([c.get('masked_patch_fraction', 0.0) for c in group]):.1%} | "
            + " | ".join(mean_std([c["metrics"].get(key) for c in group]) for key, _ in METRICS) + " |"
        )
    paired = paired_differences(groups)
    if paired:
        lines += [
            "",
            "## Paired difference to no screening",
            "",
            "Per seed, variant minus `none` on the same split and test images (the seeds' test sets differ, so this "
            "pairing removes most of the spread above); mean ± sample standard deviation over the seeds, in points "
            "(x 100). A gain counts when the mean exceeds its standard deviation.",
            "",
            "| alpha | variant | seeds | Δ I-AUROC | Δ P-AUROC | Δ AUPRO |",
            "|---|---|---|---|---|---|",
        ]
        for (alpha, variant), deltas in paired.items():
            lines.append(f"| {alpha:g} | {variant} | {len(deltas['i_auroc'])} | "
                         + " | ".join(mean_std(deltas[key], 1) for key, _ in METRICS) + " |")
    screened = {key: group for key, group in groups.items() if key[1] not in ("none", "oracle")}
    if screened:
        lines += [
            "",
            "## Screening quality",
            "",
            "AUROC of stage 1's consensus score against the planted labels (1.0: every planted defect ranked above "
            "every normal image), and the images at or below the cut (the rest are the suspects).",
            "",
            "| alpha | variant | screening AUROC | suspects | normal below the cut | anomalous below the cut |",
            "|---|---|---|---|---|---|",
        ]
        for (alpha, variant), group in screened.items():
            lines.append(
                f"| {alpha:g} | {variant} | {mean_std([c.get('screening_auroc') for c in group])} | "
                f"{np.mean([c['train'] - c['below_cut'] for c in group]):.1f} | "
                f"{np.mean([c['below_cut'] - c['below_cut_anomalies'] for c in group]):.1f} | "
                f"{np.mean([c['below_cut_anomalies'] for c in group]):.1f} of "
                f"{np.mean([c['train_anomalies'] for c in group]):.1f} |"
            )
    if ablation:
        lines += [
            "",
            "## k ablation (paper Figure 4)",
            "",
            "Images kept (floor(N x t)) when selected by the consensus of k sub-models, and by each "
            "single sub-model's scores alone (mean [min-max] over the k sub-models).",
            "",
            "| alpha | k | sub-model | kept | normal kept (consensus) | anomalous kept (consensus) | "
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
    groups = group_cells(cells)
    variants = list(dict.fromkeys(variant for _, variant in groups))
    for i, (key, title) in enumerate(METRICS):
        ax = fig.add_subplot(1, len(METRICS), i + 1)
        for variant in variants:
            points = [(alpha, [c["metrics"][key] for c in group if key in c["metrics"]])
                      for (alpha, v), group in groups.items() if v == variant]
            points = [(alpha, values) for alpha, values in points if values]
            if points:
                x = [alpha for alpha, _ in points]
                y = [np.mean(values) for _, values in points]
                err = [np.std(values, ddof=1) if len(values) > 1 else 0.0 for _, values in points]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=variant)
        ax.set_title(title)
        ax.set_xlabel("alpha")
        ax.grid(alpha=0.3)
    fig.axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_fractions(path: Path, cells: list[dict]) -> None:
    fig = Figure(figsize=(5.5, 3.6), dpi=110)
    ax = fig.add_subplot()
    groups = group_cells(cells)
    for variant in dict.fromkeys(variant for _, variant in groups):
        points = [(alpha, np.mean([c["anomaly_fraction"] for c in group]))
                  for (alpha, v), group in groups.items() if v == variant]
        label = "none (= train)" if variant == "none" else variant
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xlabel("alpha")
    ax.set_ylabel("anomaly fraction below the cut")
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


def seeded(cfg: RunConfig, seed: int) -> RunConfig:
    """``cfg`` with one seed for the split (which defects are planted), stage 1 and stage 2."""
    scfg = copy.deepcopy(cfg)
    scfg.data.split_seed = scfg.train.seed = scfg.llb.seed = seed
    return scfg


def run_contamination_bench(
    cfg: RunConfig,
    alphas: list[float] | tuple[float, ...] = DEFAULT_ALPHAS,
    ks: list[int] | tuple[int, ...] = DEFAULT_KS,
    out_dir: Path = Path("bench_out/contamination"),
    variants: list[str] | tuple[str, ...] = ("none", "default", "fixed"),
    ablation_alphas: Sequence[float] | None = None,
    ablation_submodel: str = "dinomaly",
    seeds: list[int] | tuple[int, ...] | None = None,
) -> Path:
    """Run the benchmark into ``out_dir`` (resumable); returns the path of the Markdown table.

    ``seeds``: one full repeat per seed (default: ``cfg.data.split_seed`` alone).
    ``ablation_alphas``: where to run the k ablation (first seed only); default: the largest alpha > 0
    in ``alphas`` (one level bounds its cost: sum(ks) sub-model fits); [] skips it, as does ks = [].
    """
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    seeds = list(seeds) if seeds else [cfg.data.split_seed]
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
    for seed in seeds:
        scfg = seeded(cfg, seed)
        seed_ablation = ablation_alphas if seed == seeds[0] else []
        for alpha in sorted(set(alphas) | set(seed_ablation)):
            split = validate_split(load_contaminated(scfg.data, alpha, seed), scfg.data.on_bad_file)
            log.info("seed %d, alpha %g: %s", seed, alpha, split.summary())
            alpha_dir = out_dir / f"seed_{seed}" / f"alpha_{alpha:g}"
            pending = [v for v in variants if alpha in alphas and not (alpha_dir / v / "result.json").is_file()]
            if not pending and alpha not in seed_ablation:
                cells += [json.loads((alpha_dir / v / "result.json").read_text()) for v in variants]
                continue
            # One feature cache per contaminated training set, shared by all its variants and k runs.
            images = load_model_inputs(split.train, geometry, desc=f"train images (seed {seed}, alpha {alpha:g})")
            features = EncodedImages.from_config(model, images, device, scfg.train, spill_dir=alpha_dir)
            if alpha in alphas:
                cells += [run_variant(scfg, variant, alpha, split, encoder, features, alpha_dir / variant, device)
                          for variant in variants]
            if alpha in seed_ablation:
                for k in ks:
                    stage_dir = alpha_dir / f"ablation_k{k}"
                    ablation.append(k_ablation_row(scfg, k, alpha, split, encoder, features, stage_dir,
                                                   ablation_submodel))
            del features, images
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    meta = {"device": str(device), "seconds": time.perf_counter() - t0, "command": " ".join(sys.argv), "seeds": seeds}
    runs.write_json(out_dir / "results.json", {"meta": meta, "cells": cells, "k_ablation": ablation})
    if cells:
        plot_metrics(out_dir / "metrics_vs_alpha.png", cells)
        plot_fractions(out_dir / "dpure_anomaly_fraction.png", cells)
    if ablation:
        plot_ablation(out_dir / "k_ablation.png", ablation)
    markdown = out_dir / "contamination.md"
    write_markdown(markdown, cfg, seeds, cells, ablation, meta)
    return markdown
