"""How much of the gap to published MTD numbers is scale? Paired differences between bench runs.

    .venv/bin/python bench/scale_decomposition.py bench_out/scale/base168 bench_out/scale/px224 \\
        bench_out/scale/its300 bench_out/scale/crop256

Each argument is the ``--out`` folder of one `llb-edge bench contamination --variants none --alphas 0`
run that changes one setting against the first (the baseline); the same seeds split, train and test
alike in every run, so a per-seed difference isolates the setting. Prints, per run: its settings,
mean ± standard deviation of I-AUROC, P-AUROC and AUPRO over the seeds, and the mean ± standard
deviation of the per-seed difference to the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = ("i_auroc", "p_auroc", "aupro")
SETTINGS = ("data.resize", "data.crop", "train.iterations")


def per_seed(out_dir: Path) -> dict[int, dict[str, float]]:
    cells = json.loads((out_dir / "results.json").read_text())["cells"]
    return {c["seed"]: c["metrics"] for c in cells if c["variant"] == "none" and c["alpha"] == 0.0}


def settings(out_dir: Path) -> str:
    invoked = (out_dir / "contamination.md").read_text()
    found = {}
    for key in SETTINGS:
        for part in invoked.split("--set ")[1:]:
            name, _, value = part.split()[0].partition("=")
            if name == key:
                found[key] = value  # the last --set of a key wins, as in the CLI
    return ", ".join(f"{k.split('.')[-1]} {v}" for k, v in found.items())


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="bench output folders, the baseline first")
    args = parser.parse_args()
    baseline = per_seed(args.runs[0])
    lines = ["| run | settings | seeds | " + " | ".join(m for m in METRICS) + " | "
             + " | ".join(f"Δ{m} vs baseline" for m in METRICS) + " |", "|---" * (3 + 2 * len(METRICS)) + "|"]
    for out_dir in args.runs:
        seeds = per_seed(out_dir)
        shared = sorted(set(seeds) & set(baseline))
        values = [mean_sd([seeds[s][m] for s in sorted(seeds)]) for m in METRICS]
        deltas = [mean_sd([seeds[s][m] - baseline[s][m] for s in shared]) if out_dir != args.runs[0] else "-"
                  for m in METRICS]
        lines.append(f"| {out_dir.name} | {settings(out_dir)} | {len(seeds)} | " + " | ".join(values) + " | "
                     + " | ".join(deltas) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
