"""The decision threshold a bundle ships with, set without labels.

Default rule (docs/bundle.md):

    threshold = q99.5 + 0.25 * (q99.5 - q50)

of the final model's image scores on the training images it was trained on (the images LLB kept,
``train_scores.json`` of the run). ``score >= threshold`` is NG on the line.

Why this rule:

- LLB purification leaves training images that are (nearly) all normal, so their score
  distribution estimates normal variation without any labels;
- a high quantile rather than the max: one surviving defect among the kept images must not drag
  the threshold up to its score. With fewer than ~200 images q99.5 is close to the max anyway;
- the margin: these are the images the model was fitted on, so they score lower than unseen normal
  parts; a margin above the quantile absorbs that optimism. It is proportional to the spread
  (q99.5 - q50), not to the score value, so it means the same for every encoder and dataset
  (scores have no common scale). For Gaussian scores q99.5 - q50 = 2.58 sigma, and the rule gives
  median + 3.22 sigma, the 99.94% quantile: about one false NG per 1500 normal parts if unseen
  normal parts scored like the training images; fewer once the optimism is accounted for.

An operator tunes it on the line without re-exporting (``llb-edge bundle set-threshold``). With
labelled validation images, :func:`f1max_threshold` offers the threshold maximising image F1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llb_edge import metrics

DEFAULT_QUANTILE = 0.995
DEFAULT_MARGIN = 0.25
METHOD_QUANTILE = "quantile"
METHOD_F1MAX = "f1max"


@dataclass(frozen=True)
class ThresholdChoice:
    value: float
    method: str  # METHOD_QUANTILE | METHOD_F1MAX
    description: str  # human-readable rule, stored as bundle.json threshold.method
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "method": self.method, "description": self.description, **self.details}


def quantile_threshold(
    scores: np.ndarray, quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN
) -> ThresholdChoice:
    """The default rule on raw training scores (module docstring)."""
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(values) == 0:
        raise ValueError("no training scores to set a threshold from")
    if not np.isfinite(values).all():
        raise ValueError("training scores contain NaN or inf; the model or its run is broken")
    if not 0.5 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0.5, 1], got {quantile}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    high = float(np.quantile(values, quantile))
    median = float(np.quantile(values, 0.5))
    spread = high - median
    value = high + margin * spread
    if spread == 0.0:
        # All training images score alike: any margin of 0 would make them NG (score >= threshold).
        value = math.nextafter(high, math.inf)
    description = f"q{quantile * 100:g} + {margin:g} * (q{quantile * 100:g} - q50) of kept training scores"
    details = {"quantile": quantile, "margin": margin, "q_high": high, "q50": median, "count": int(len(values))}
    return ThresholdChoice(value=float(value), method=METHOD_QUANTILE, description=description, details=details)


def stats_threshold(stats: Mapping[str, Any], margin: float = DEFAULT_MARGIN) -> ThresholdChoice:
    """The default rule from recorded statistics only (q99.5 and q50), when raw scores are absent."""
    try:
        high, median = float(stats["q99.5"]), float(stats["q50"])
    except KeyError as err:
        raise ValueError(f"score statistics lack {err}; cannot set a default threshold") from err
    spread = high - median
    value = high + margin * spread if spread > 0 else math.nextafter(high, math.inf)
    description = f"q99.5 + {margin:g} * (q99.5 - q50) of kept training scores"
    details = {"quantile": DEFAULT_QUANTILE, "margin": margin, "q_high": high, "q50": median,
               "count": int(stats.get("count", 0))}
    return ThresholdChoice(value=float(value), method=METHOD_QUANTILE, description=description, details=details)


def f1max_threshold(scores: np.ndarray, labels: np.ndarray) -> ThresholdChoice:
    """The F1-maximising threshold on labelled validation scores (``score >= t`` is anomalous)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    result = metrics.image_metrics(scores, labels)
    details = {"f1": result["i_f1max"], "i_auroc": result["i_auroc"], "count": int(len(scores)),
               "anomalous": int(np.sum(labels == 1))}
    return ThresholdChoice(value=float(result["f1max_threshold"]), method=METHOD_F1MAX,
                           description="F1-max on labelled validation images", details=details)


def read_train_scores(run_dir: str | Path) -> tuple[np.ndarray | None, dict[str, Any]]:
    """(raw scores or None, stats) from a run's ``train_scores.json``."""
    from llb_edge.runs import TRAIN_SCORES, RunError

    path = Path(run_dir) / TRAIN_SCORES
    if not path.is_file():
        raise RunError(f"{path} is missing: the run has no training-score statistics (re-run training)")
    values = json.loads(path.read_text())
    stats = dict(values.get("stats", {}))
    raw = values.get("scores")
    scores = np.asarray(list(raw.values()), dtype=np.float64) if isinstance(raw, dict) and raw else None
    return scores, stats


def default_threshold(run_dir: str | Path, margin: float = DEFAULT_MARGIN) -> ThresholdChoice:
    """The default rule for a run: from raw training scores when recorded, else from the stats."""
    scores, stats = read_train_scores(run_dir)
    if scores is not None:
        return quantile_threshold(scores, DEFAULT_QUANTILE, margin)
    return stats_threshold(stats, margin)
