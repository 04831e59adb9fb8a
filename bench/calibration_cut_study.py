"""Which outlier cut should the calibration slice use? Every rule, on completed runs, after the fact.

    .venv/bin/python bench/calibration_cut_study.py bench_out/frr2/runs/* runs/demo-a --target-frr 0.05

For each run directory (a finished `llb-edge train` run with a calibration slice and a labelled test
split: bench/frr_calibration.py's runs, the demo's), each rule below leaves some calibration scores
out as suspected defects, sets the conformal threshold for ``--target-frr`` on the rest
(llb_edge.calibration.threshold_for_target) and is measured on the run's test scores
(``test_scores.jsonl``, the final model in PyTorch; the model never saw those images): false-reject
rate on the normal test images, escape rate on the defective ones. The planted labels of the
calibration images (known in benchmark runs) say how many normal parts and defects each rule left
out. Rules: no cut; the product's RobustScale (median + z x half-normal sigma from below the
median) at several z; the classic MAD cut (median + z x 1.4826 MAD) at several z.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from llb_edge.calibration import split_outliers, threshold_for_target
from llb_edge.runs import CALIBRATION_SCORES, TEST_SCORES, read_split

Z_VALUES = (2.5, 3.0, 3.5, 4.0)


def mad_inliers(scores: np.ndarray, z: float) -> np.ndarray:
    median = float(np.median(scores))
    return scores[scores <= median + z * 1.4826 * float(np.median(np.abs(scores - median)))]


def one_run(run_dir: Path, target_frr: float) -> dict[str, dict[str, float]]:
    labels = {sample.path: sample.label for sample in read_split(run_dir).calibration}
    calibration = json.loads((run_dir / CALIBRATION_SCORES).read_text())["scores"]
    scores = np.asarray(list(calibration.values()))
    is_defect = np.asarray([labels.get(path) == 1 for path in calibration])
    test = [json.loads(line) for line in (run_dir / TEST_SCORES).read_text().splitlines()]
    test_scores = np.asarray([t["score"] for t in test])
    test_labels = np.asarray([t["label"] for t in test])
    inliers_by_rule: dict[str, np.ndarray] = {"no cut": scores}
    for z in Z_VALUES:
        inliers_by_rule[f"RobustScale z {z:g}"] = np.asarray(split_outliers(scores.tolist(), z)[0])
    for z in Z_VALUES[:3]:
        inliers_by_rule[f"MAD z {z:g}"] = mad_inliers(scores, z)
    rows = {}
    for rule, inliers in inliers_by_rule.items():
        estimate = threshold_for_target(inliers, target_frr, outlier_z=None)
        left_out = ~np.isin(scores, inliers)
        rows[rule] = {
            "left_out_normal": int(np.sum(left_out & ~is_defect)),
            "left_out_defects": int(np.sum(left_out & is_defect)),
            "calibration_defects": int(is_defect.sum()), "threshold": estimate.threshold,
            "upper": estimate.upper,
            "frr": float(np.mean(test_scores[test_labels == 0] >= estimate.threshold)),
            "escape": float(np.mean(test_scores[test_labels == 1] < estimate.threshold)),
        }
    return rows


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(results: dict[str, dict[str, dict[str, float]]], target_frr: float) -> str:
    runs = list(results)
    rules = list(next(iter(results.values())))
    lines = [f"# Calibration outlier cut, target false-reject rate {100 * target_frr:g}%", "",
             "Runs (calibration images (planted defects among them)): " + ", ".join(
                 f"`{Path(r).name}` ({len(json.loads((Path(r) / CALIBRATION_SCORES).read_text())['scores'])} "
                 f"({results[r][rules[0]]['calibration_defects']}))" for r in runs), "",
             "| rule | left out, normal/defects, per run | measured FRR per run | FRR mean ± sd "
             "| 95% bound per run | escape mean ± sd |", "|---|---|---|---|---|---|"]
    for rule in rules:
        cells = [results[r][rule] for r in runs]
        frr = [100 * c["frr"] for c in cells]
        escape = [100 * c["escape"] for c in cells]
        left_out = " ".join("{}/{}".format(c["left_out_normal"], c["left_out_defects"]) for c in cells)
        bounds = " ".join("{:.1f}".format(100 * c["upper"]) for c in cells)
        lines.append(
            f"| {rule} | {left_out} | {' '.join(f'{v:.1f}' for v in frr)} | "
            f"{statistics.mean(frr):.1f} ± {spread(frr):.1f} | {bounds} | "
            f"{statistics.mean(escape):.1f} ± {spread(escape):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    parser.add_argument("--target-frr", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = parser.parse_args()
    results = {str(run): one_run(run, args.target_frr) for run in args.runs}
    report = markdown(results, args.target_frr)
    if args.out:
        args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
