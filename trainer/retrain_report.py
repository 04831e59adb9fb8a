"""The retrain comparison report: report.html with scores.png and agreement.png, next to decision.json.

Scores of two different models have no common scale, so each model's histogram gets its own axis
with its own threshold; the scatter plot (current score vs candidate score, both thresholds drawn)
shows which frames change decision and how far from the thresholds they are.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

SCORES_PNG, AGREEMENT_PNG, REPORT_HTML = "scores.png", "agreement.png", "report.html"
COLORS = {"OK->OK": "#4c72b0", "NG->NG": "#c44e52", "OK->NG": "#dd8452", "NG->OK": "#8172b3"}


def _arrays(comparison: dict[str, Any], subset: str, side: str) -> np.ndarray:
    return np.asarray([f[side] for f in comparison["frames"] if f["set"] == subset], dtype=np.float64)


def plot_scores(comparison: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(9, 3.4), dpi=100)
    for index, side in enumerate(("current", "candidate")):
        ax = fig.add_subplot(1, 2, index + 1)
        info = comparison[side]
        held = _arrays(comparison, "holdout", side)
        if len(held):
            ax.hist(held, bins=min(40, max(5, len(held) // 3)), color="#4c72b0", alpha=0.8, label="held-back")
        labeled = [f for f in comparison["frames"] if f["set"] == "labeled"]
        for label, color in (("OK", "#55a868"), ("NG", "#c44e52")):
            values = [f[side] for f in labeled if f["label"] == label]
            if values:
                ax.plot(values, np.zeros(len(values)), "|", color=color, markersize=14, label=f"labelled {label}")
        ax.axvline(info["threshold"], color="black", linestyle="--", label="threshold")
        ax.set_title(f"{side} {info['model_version']}", fontsize=9)
        ax.set_xlabel("image score")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def plot_agreement(comparison: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(4.8, 4.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    cur_t, cand_t = comparison["current"]["threshold"], comparison["candidate"]["threshold"]
    cur, cand = _arrays(comparison, "holdout", "current"), _arrays(comparison, "holdout", "candidate")
    kinds = np.asarray([f"{'NG' if a >= cur_t else 'OK'}->{'NG' if b >= cand_t else 'OK'}" for a, b in zip(cur, cand,
                                                                                                    strict=True)])
    for kind, color in COLORS.items():
        chosen = kinds == kind
        if np.any(chosen):
            ax.scatter(cur[chosen], cand[chosen], s=12, color=color, label=f"{kind} ({int(chosen.sum())})")
    ax.axvline(cur_t, color="black", linestyle="--", linewidth=0.8)
    ax.axhline(cand_t, color="black", linestyle="--", linewidth=0.8)
    disagreement = comparison.get("disagreement")
    title = "held-back frames" + (f": decisions differ on {disagreement:.1%}" if disagreement is not None else "")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("current score")
    ax.set_ylabel("candidate score")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def write_report(report_dir: Path, comparison: dict[str, Any], decision: dict[str, Any]) -> Path:
    """report.html (with its two PNGs) in ``report_dir``; returns the HTML path."""
    plot_scores(comparison, report_dir / SCORES_PNG)
    plot_agreement(comparison, report_dir / AGREEMENT_PNG)
    e = html.escape
    verdict = "passed" if decision["passed"] else "FAILED"
    checks = "".join(
        f"<tr class=\"{'ok' if c['passed'] else 'bad'}\"><td>{e(c['name'])}</td><td>{'pass' if c['passed'] else 'FAIL'}"
        f"</td><td>{e(c['detail'])}</td></tr>" for c in decision["checks"])
    keys = ["model_version", "threshold", "ng_rate"]
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(_fmt(comparison['current'].get(k)))}</td>"
                   f"<td>{e(_fmt(comparison['candidate'].get(k)))}</td></tr>" for k in keys)
    for side_key in sorted(set(comparison["current"]["score"]) | set(comparison["candidate"]["score"])):
        rows += (f"<tr><th>score {e(side_key)}</th><td>{_fmt(comparison['current']['score'].get(side_key))}</td>"
                 f"<td>{_fmt(comparison['candidate']['score'].get(side_key))}</td></tr>")
    for key in sorted(set(comparison["current"]["labeled"]) | set(comparison["candidate"]["labeled"])):
        rows += (f"<tr><th>labelled {e(key)}</th><td>{_fmt(comparison['current']['labeled'].get(key))}</td>"
                 f"<td>{_fmt(comparison['candidate']['labeled'].get(key))}</td></tr>")
    summary = {
        "held-back frames": comparison["holdout"]["frames"],
        "labelled frames (OK / NG)": f"{comparison['labeled_counts']['OK']} / {comparison['labeled_counts']['NG']}",
        "decisions differ": comparison.get("disagreement"),
        "OK -> NG": comparison.get("ok_to_ng"), "NG -> OK": comparison.get("ng_to_ok"),
        "score rank correlation": comparison.get("spearman"),
        "replay check (max |score diff|)": comparison.get("replay_check", {}).get("max_abs_diff"),
        "pool": comparison.get("pool"), "timing (s)": {k: round(v, 1) for k, v in decision.get("timing", {}).items()},
    }
    summary_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(_fmt(v))}</td></tr>" for k, v in summary.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>llb-edge retrain {e(decision['candidate_version'])}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}td,th{{padding:2px 8px;text-align:left}}
tr.bad td{{color:#b00}} table{{border-collapse:collapse;margin-bottom:1em}}</style></head><body>
<h1>Retrain {e(decision['candidate_version'])}: gate {verdict}</h1>
<p>candidate {e(decision['candidate_version'])} vs current {e(decision['current_version'])};
{'promoted' if decision.get('promoted') else 'promotion requested' if decision['passed'] else 'not promoted'}.
NG rates and disagreement weigh each pool frame by 1/(its capture probability).</p>
<h2>Gate</h2><table>{checks}</table>
<h2>Models</h2><table><tr><th></th><th>current</th><th>candidate</th></tr>{rows}</table>
<h2>Held-back slice</h2><table>{summary_rows}</table>
<img src="{SCORES_PNG}" alt="score histograms"><br><img src="{AGREEMENT_PNG}" alt="agreement">
</body></html>
"""
    path = report_dir / REPORT_HTML
    path.write_text(page, encoding="utf-8")
    return path
