"""LLB stage 1's screening report: ``report.html`` with its plots and the panels of the removed images.

What stage 1 decided (trainer/llb.py) shown to a person reviewing the training set: the summary, the
consensus-score histogram with the cut, kept and removed images per subset, the suspects ranked for
review, and the highest-scored suspects with their consensus anomaly maps. This module only reads
the stage's result; the selection itself is computed in trainer/llb.py.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from matplotlib.figure import Figure

from llb_edge.data.images import read_image_rgb, read_mask
from llb_edge.data.samples import UNKNOWN, Sample
from llb_edge.data.transforms import Geometry
from llb_edge.trainer.evaluate import overlay
from llb_edge.trainer.submodels import Stage1Context

if TYPE_CHECKING:
    from llb_edge.trainer.llb import ScreeningTable, Stage1Result

REPORT = "report.html"
REPORT_REMOVED = 8  # removed images shown with their anomaly maps

# Positions into the sample list -> the consensus anomaly maps there (the mean of the sub-models' maps).
ConsensusMaps = Callable[[np.ndarray], np.ndarray]


def plot_histogram(
    path: Path, samples: list[Sample], consensus: dict[str, float], threshold: float, labelled: bool
) -> None:
    fig = Figure(figsize=(7, 3.6), dpi=110)
    ax = fig.add_subplot()
    values = np.asarray([consensus[s.path] for s in samples])
    bins = np.histogram_bin_edges(values, bins=min(60, max(10, len(values) // 4))).tolist()
    if labelled:
        labels = np.asarray([s.label for s in samples])
        ax.hist([values[labels == 0], values[labels == 1]], bins=bins, stacked=True,
                label=["normal", "anomalous"], color=["tab:blue", "tab:red"])
    else:
        ax.hist(values, bins=bins, color="tab:blue", label="images")
    ax.axvline(threshold, color="black", linestyle="--", label=f"cut {threshold:.4g} (kept: at or below)")
    ax.legend(fontsize=8)
    ax.set_xlabel("consensus score (mean of the sub-models' raw scores)")
    ax.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path)


def plot_subset_counts(path: Path, table: ScreeningTable, kept: set[str], k: int) -> None:
    kept_counts = np.zeros(k, int)
    removed_counts = np.zeros(k, int)
    for p, j in table.subset.items():
        if p in kept:
            kept_counts[j] += 1
        else:
            removed_counts[j] += 1
    fig = Figure(figsize=(max(4, 1.1 * k + 2), 3.2), dpi=110)
    ax = fig.add_subplot()
    x = np.arange(k)
    ax.bar(x, kept_counts, label="kept", color="tab:green")
    ax.bar(x, removed_counts, bottom=kept_counts, label="removed", color="tab:gray")
    ax.set_xticks(x, [f"subset {j}" for j in x])
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def removed_panels(
    stage_dir: Path, ctx: Stage1Context, samples: list[Sample], result: Stage1Result, consensus_maps: ConsensusMaps
) -> list[tuple[str, Sample, float]]:
    """PNG panels (image | consensus map over it) of the highest-scored removed images."""
    kept = set(result.kept)
    removed = [p for p in sorted(result.consensus, key=lambda p: -result.consensus[p]) if p not in kept]
    chosen = removed[:REPORT_REMOVED]
    if not chosen:
        return []
    position = {s.path: i for i, s in enumerate(samples)}
    positions = np.asarray([position[p] for p in chosen])
    maps = consensus_maps(positions)
    geometry = Geometry(ctx.cfg.data.resize, ctx.cfg.data.crop)
    out_dir = stage_dir / "removed"
    out_dir.mkdir(exist_ok=True)
    vmax = float(maps.max())
    panels = []
    for rank, (p, anomaly_map) in enumerate(zip(chosen, maps, strict=True)):
        sample = samples[position[p]]
        mask = None
        if sample.mask_path:
            rgb = read_image_rgb(sample.path)
            mask = geometry.mask_to_model(read_mask(sample.mask_path, *rgb.shape[:2]))
        name = f"removed/{rank:02d}.png"
        cv2.imwrite(str(stage_dir / name), overlay(ctx.features.images[position[p]], anomaly_map, mask, vmax))
        panels.append((name, sample, result.consensus[p]))
    return panels


def write_report(
    stage_dir: Path, ctx: Stage1Context, samples: list[Sample], result: Stage1Result, consensus_maps: ConsensusMaps
) -> None:
    """report.html with its PNGs: summary, score histogram with the cut, per-subset counts, removed images."""
    s = result.summary
    # The page links the stage's table and D_pure list by the names the summary records for them.
    table, purified = Path(s["table"]).name, Path(s["purified_list"]).name
    plot_histogram(stage_dir / "score_histogram.png", samples, result.consensus, s["threshold"], s["labels_known"])
    plot_subset_counts(stage_dir / "subset_counts.png", result.table, set(result.kept), ctx.cfg.llb.k)
    panels = removed_panels(stage_dir, ctx, samples, result, consensus_maps)

    rows = [
        ("sub-model", s["submodel"] + (f", {s['submodel_iterations']} iterations" if s["submodel_iterations"] else "")),
        ("subsets k", f"{s['k']} (sizes {', '.join(map(str, s['subset_sizes']))})"),
        ("cut", f"{s['threshold']:.6g}: " + (
            f"median {s['consensus_median']:.4g} + {s['outlier_z']:g} x robust sigma {s['consensus_scale']:.4g}"
            if s["keep"] == "auto" else f"fixed keep fraction {s['keep']}: floor({s['images']} x {s['keep']})")),
        ("images above the cut (estimated contamination)",
         f"{s['removed']} of {s['images']} ({s['estimated_contamination']:.1%})"),
        ("what happens to them", "kept, suspect patches masked out of the stage-2 loss "
         f"({s['masked_patch_fraction']:.2%} of all patches)" if s["above_cut"] == "mask" else "dropped"),
        ("sub-model fit time (s)", ", ".join(f"{t:.1f}" for t in s["submodel_fit_seconds"])),
    ]
    if s["labels_known"]:
        rows += [
            ("anomaly fraction before screening",
             f"{s['anomaly_fraction_before']:.2%} ({s['anomalies_before']} of {s['images']})"),
            ("anomaly fraction after screening (D_pure)",
             f"{s['anomaly_fraction_after']:.2%} ({s['anomalies_after']} of {s['kept']})"),
        ]
    else:
        rows.append(("anomaly fraction", "unknown: the training images are unlabelled"))
    table_html = "".join(f"<tr><th>{html.escape(a)}</th><td>{html.escape(b)}</td></tr>" for a, b in rows)
    by_path = {sample.path: sample for sample in samples}
    suspects_html = "".join(
        f"<tr><td>{rank + 1}</td><td>{html.escape(item['path'])}</td><td>{item['score']:.5g}</td>"
        f"<td>{item['z']:.2f}</td><td>{'' if by_path[item['path']].label == UNKNOWN else by_path[item['path']].label}"
        "</td></tr>"
        for rank, item in enumerate(s["suspects"])
    )
    figures = "".join(
        f'<figure><img src="{name}" alt="removed image {i}"><figcaption>{html.escape(Path(sample.path).name)}'
        f"<br>score {score:.5g}{'' if sample.label == UNKNOWN else ', label ' + str(sample.label)}"
        f"</figcaption></figure>"
        for i, (name, sample, score) in enumerate(panels)
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>LLB stage 1 screening</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
figure {{ display: inline-block; margin: 6px; font-size: 12px; }} figure img {{ height: 160px; }}
</style></head><body>
<h1>LLB stage 1: screening report</h1>
<p>{s['images']} training images were split into {s['k']} disjoint subsets; a sub-model was fitted on each,
every sub-model scored every training image, and the ranking of their mean score was cut; the final model
trains on <a href="{purified}">{purified}</a>. Per-image scores: <a href="{table}">{table}</a>.</p>
<table>{table_html}</table>
<h2>Consensus scores and the cut</h2>
<img src="score_histogram.png" alt="score histogram">
<h2>Kept and removed per subset</h2>
<img src="subset_counts.png" alt="kept and removed per subset">
<h2>Suspects, ranked for review</h2>
<p>The images above the cut, highest consensus score first (z: robust standard deviations above the
median). A person reviewing the training set should look at these first.</p>
<table><tr><th>#</th><th>image</th><th>score</th><th>z</th><th>label</th></tr>{suspects_html}</table>
<h2>Highest-scored suspects</h2>
<p>Left: the model input; right: the consensus anomaly map (mean of the sub-models' maps) over it,
ground-truth outline in green where a mask is known.</p>
{figures or "<p>no suspects</p>"}
</body></html>
"""
    (stage_dir / REPORT).write_text(page, encoding="utf-8")
