"""Does the calibrated threshold give the false-reject rate it promises? N seeds of a small MTD run.

    .venv/bin/python bench/frr_calibration.py                    # 3 seeds x (llb, llb-kept), 5% target
    .venv/bin/python bench/frr_calibration.py --quick            # tiny random encoder, one seed: a smoke run
    .venv/bin/python bench/frr_calibration.py --variants llb,stage2,llb-contaminated --set train.iterations=300

For each variant and seed: train (``train.seed`` = ``llb.seed`` = the seed), export the bundle with
``--target-frr`` (its threshold is the conformal order statistic of the held-back calibration
slice), then measure on the run's test split, which the model never saw: the false-reject rate
(normal test images scored NG) and the escape rate (defective test images scored OK) at the
bundle's threshold, on the exported ONNX graph. The calibration slice is a quarter of 400 training
images here (``train.calibration_fraction=0.25``: 100 images for the default source) so one seed's
measurement is not all sampling noise: with n calibration images the true rate of one run spreads
like Beta(x + 1, n - x) around the promise. Alongside, on the same test scores:

- the same conformal rule without the outlier cut (every calibration image kept, the rule before the
  cut existed): how many false rejects the cut costs on a clean set, how many escapes it saves on a
  dirty one;
- the old rule (``q99.5 + 0.25 * (q99.5 - q50)`` of the training scores) for comparison;
- LLB only: the threshold the same conformal rule would give on stage 1's out-of-subset scores
  (each kept image scored by the sub-models that did not train on it), applied to the final model;
- LLB only: the false-reject rate on the normal training images stage 1 removed (also unseen by the
  final model): D_pure is the easiest ``llb.keep`` of the training set, so a calibration slice drawn
  from it can score lower than the line's normal parts; this column shows whether it does.

Variants (all others settings as BASE): ``llb`` (the defaults: stage 1 + 2, calibration slice held
back from the whole training set before screening), ``llb-kept`` (the slice taken from D_pure
after screening instead), ``stage2`` (no screening: the calibration mechanism alone) and
``llb-contaminated`` (``data.contamination`` = 0.1 unlabelled defects in training and calibration).
Writes ``frr_calibration.json`` and ``frr_calibration.md`` to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llb_edge import runs
from llb_edge.bundle import THRESHOLD_CANDIDATES_KEY, VALIDATION_KEY
from llb_edge.calibration import threshold_for_target
from llb_edge.config import RunConfig, load_config
from llb_edge.data.images import read_image_rgb
from llb_edge.data.transforms import Geometry
from llb_edge.exporters.bundle_export import export_bundle
from llb_edge.exporters.export_options import ExportOptions
from llb_edge.exporters.parity import onnxruntime_runner
from llb_edge.exporters.threshold import METHOD_QUANTILE, labelled_rates
from llb_edge.trainer.llb import TABLE as STAGE1_TABLE

REPO = Path(__file__).resolve().parents[1]
MTD = REPO.parent / "shared" / "data" / "mtd"

BASE = [
    "data.dataset=mtd", f"data.root={MTD}", "data.max_train=400", "data.resize=224", "data.crop=224",
    "train.calibration_fraction=0.25",
    "train.iterations=150", "train.batch_size=8", "train.warmup_iterations=15", "train.hm_ramp_iterations=60",
    "train.checkpoint_every=1000", "llb.k=3", "llb.submodel_iterations=50", "eval.overlays=0",
]
QUICK = [
    "data.max_train=30", "data.max_test=24", "data.resize=56", "data.crop=56", "model.encoder=test_tiny_patch14",
    "model.weights=random", "train.iterations=8", "train.batch_size=4", "train.warmup_iterations=3",
    "train.hm_ramp_iterations=6", "train.device=cpu", "llb.k=2", "llb.submodel_iterations=4", "eval.map_size=56",
]
VARIANTS = {
    "llb": [],
    "llb-kept": ["train.calibration_source=kept"],
    "stage2": ["llb.stages=2"],
    "llb-contaminated": ["data.contamination=0.1"],
}


def onnx_scores(onnx_path: Path, paths: list[str], geometry: Geometry, batch: int = 16) -> np.ndarray:
    run = onnxruntime_runner(onnx_path)
    scores = [run(np.stack([geometry.to_model_input(read_image_rgb(p)) for p in paths[i : i + batch]]))[1]
              for i in range(0, len(paths), batch)]
    return np.concatenate(scores).reshape(-1) if scores else np.zeros(0)


def stage1_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / runs.STAGE1 / STAGE1_TABLE, newline="") as handle:
        return list(csv.DictReader(handle))


def out_of_subset_scores(rows: list[dict[str, str]]) -> list[float]:
    """Each kept image's mean score over the sub-models that did not train on it."""
    k = sum(1 for key in rows[0] if key.startswith("score_"))
    return [float(np.mean([float(r[f"score_{j}"]) for j in range(k) if j != int(r["subset"])]))
            for r in rows if r["status"] == "kept"]


def rate(scores: np.ndarray, threshold: float) -> float | None:
    return float(np.mean(scores >= threshold)) if len(scores) else None


def one_run(cfg: RunConfig, target_frr: float, bundle_dir: Path) -> dict[str, Any]:
    from llb_edge.trainer.pipeline import run_training

    started = time.perf_counter()
    run_dir = run_training(cfg)
    train_s = time.perf_counter() - started
    bundle = export_bundle(run_dir, bundle_dir, ExportOptions(precisions=("fp32",), target_frr=target_frr,
                                                              validation="test", overwrite=True))
    manifest = bundle.manifest
    threshold, frr = manifest.threshold.value, manifest.threshold.frr
    measured = manifest.extra[VALIDATION_KEY]
    test = [json.loads(line) for line in (run_dir / runs.TEST_SCORES).read_text().splitlines()]
    scores = np.asarray([t["score"] for t in test])
    labels = np.asarray([t["label"] for t in test])
    normal = scores[labels == 0]
    calibration = np.asarray(manifest.extra["calibration"]["scores"])
    label_of = {sample.path: sample.label for sample in runs.read_split(run_dir).calibration}
    calibration_paths = runs.read_json(run_dir / runs.CALIBRATION_SCORES)["scores"]
    train_scores = np.asarray(list(runs.read_json(run_dir / runs.TRAIN_SCORES)["scores"].values()))
    quantile = manifest.extra[THRESHOLD_CANDIDATES_KEY][METHOD_QUANTILE]["value"]
    row: dict[str, Any] = {
        "run": str(run_dir), "calibration_count": frr["calibration_count"], "threshold": threshold,
        "expected_frr": frr["expected"], "upper_frr": frr["upper"], "reachable": frr["reachable"],
        "frr": measured["false_reject_rate"], "escape": measured["escape_rate"],
        "test_normal": measured["normal"], "test_anomalous": measured["anomalous"],
        "frr_quantile_rule": rate(normal, quantile),
        "escape_quantile_rule": labelled_rates(scores, labels, quantile)["escape_rate"],
        "median_calibration": float(np.median(calibration)), "median_train": float(np.median(train_scores)),
        "median_test_normal": float(np.median(normal)), "train_seconds": round(train_s, 1),
        "calibration_defects": sum(1 for path in calibration_paths if label_of.get(path) == 1),
        "excluded": frr["excluded"], "upper_if_normal": frr["upper_if_normal"],
        "excluded_defects": sum(1 for path, value in calibration_paths.items()
                                if frr["outlier_cut"] is not None and value > frr["outlier_cut"]
                                and label_of.get(path) == 1),
    }
    no_cut = threshold_for_target(calibration, target_frr, outlier_z=None).threshold
    no_cut_rates = labelled_rates(scores, labels, no_cut)
    row.update({"threshold_no_cut": no_cut, "frr_no_cut": no_cut_rates["false_reject_rate"],
                "escape_no_cut": no_cut_rates["escape_rate"]})
    if (run_dir / runs.STAGE1 / STAGE1_TABLE).is_file():
        rows = stage1_rows(run_dir)
        alternative = threshold_for_target(out_of_subset_scores(rows), target_frr).threshold
        removed = [r["path"] for r in rows if r["status"] == "removed" and r["label"] == "0"]
        removed_scores = onnx_scores(bundle.file_path("onnx-fp32"), removed, Geometry(cfg.data.resize, cfg.data.crop))
        row.update({
            "frr_stage1_out_of_subset": rate(normal, alternative),
            "median_stage1_out_of_subset": float(np.median(out_of_subset_scores(rows))),
            "removed_normals": len(removed), "frr_removed_normals": rate(removed_scores, threshold),
        })
    return row


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f}% ± {100 * sd:.1f}"


def markdown(results: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> str:
    target = meta["target_frr"]
    low, high = target / 2, 2 * target
    lines = [
        f"# False-reject rate of the calibrated threshold (target {pct(target)})", "",
        f"- {meta['device']}; {meta['seeds']} seeds; settings: `{' '.join(meta['overrides'])}`",
        f"- acceptance band per seed: measured false-reject rate in [{pct(low)}, {pct(high)}]", "",
        "| variant | seed | n cal (defects) | outliers left out (defects) | threshold | expected FRR (95% bound; "
        "if outliers normal) | measured FRR | escape | no outlier cut: FRR / escape "
        "| old rule FRR | stage-1 OOS FRR | removed-normal FRR | median cal / train / test-normal | in band |",
        "|---|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for variant, rows in results.items():
        for seed, r in zip(meta["seed_list"], rows, strict=True):
            band = "yes" if r["frr"] is not None and low <= r["frr"] <= high else "NO"
            lines.append(
                f"| {variant} | {seed} | {r['calibration_count']} ({r['calibration_defects']}) | "
                f"{r['excluded']} ({r['excluded_defects']}) | {r['threshold']:.4g} | "
                f"{pct(r['expected_frr'])} ({pct(r['upper_frr'])}; {pct(r['upper_if_normal'])}) | "
                f"{pct(r['frr'])} of {r['test_normal']} | {pct(r['escape'])} | "
                f"{pct(r['frr_no_cut'])} / {pct(r['escape_no_cut'])} | {pct(r['frr_quantile_rule'])} | "
                f"{pct(r.get('frr_stage1_out_of_subset'))} | {pct(r.get('frr_removed_normals'))} | "
                f"{r['median_calibration']:.4g} / {r['median_train']:.4g} / {r['median_test_normal']:.4g} | {band} |")
    lines += ["", "| variant | measured FRR mean ± sd | escape mean ± sd | no outlier cut: FRR / escape mean ± sd "
              "| old rule FRR mean ± sd | seeds in band |",
              "|---|---|---|---|---|---|"]
    for variant, rows in results.items():
        in_band = sum(1 for r in rows if r["frr"] is not None and low <= r["frr"] <= high)
        lines.append(f"| {variant} | {mean_sd([r['frr'] for r in rows])} | {mean_sd([r['escape'] for r in rows])} | "
                     f"{mean_sd([r['frr_no_cut'] for r in rows])} / {mean_sd([r['escape_no_cut'] for r in rows])} | "
                     f"{mean_sd([r['frr_quantile_rule'] for r in rows])} | {in_band} of {len(rows)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2; --quick 0)")
    parser.add_argument("--variants", default="llb,llb-kept", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--target-frr", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="tiny random encoder on CPU: a smoke run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override k=v")
    parser.add_argument("--out", default="runs/bench-frr", help="work and report folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    out = Path(args.out)
    overrides = BASE + (QUICK if args.quick else []) + args.overrides
    results: dict[str, list[dict[str, Any]]] = {}
    for variant in variants:
        for seed in seeds:
            name = f"{variant}-seed{seed}"
            cfg = load_config(None, [*overrides, *VARIANTS[variant], f"train.seed={seed}", f"llb.seed={seed}",
                                     f"name={name}", f"out_dir={out / 'runs'}"])
            if (cfg.run_dir / runs.CONFIG).exists():
                raise SystemExit(f"{cfg.run_dir} already holds a run: choose another --out")
            row = one_run(cfg, args.target_frr, out / "bundles" / name)
            results.setdefault(variant, []).append(row)
            print(f"{name}: measured FRR {pct(row['frr'])} (expected {pct(row['expected_frr'])}), "
                  f"escape {pct(row['escape'])}", flush=True)
    gpu = torch.cuda.is_available() and not args.quick
    meta = {"target_frr": args.target_frr, "seeds": len(seeds), "seed_list": seeds, "overrides": overrides,
            "device": torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()})"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "frr_calibration.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    report = markdown(results, meta)
    (out / "frr_calibration.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
