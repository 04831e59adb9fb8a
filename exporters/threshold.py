"""The decision threshold a bundle ships with, set without labels for a stated false-reject rate.

Default rule (docs/bundle.md): the user states the false-reject rate (FRR) they accept
(``--target-frr``, default 1%), and the threshold is the split-conformal order statistic of the
final model's scores on the **calibration slice**: training images the trainer held back (by
default before LLB stage 1, ``train.calibration_source``) and scored with the final model at the
end (``calibration_scores.json`` of the run, ``train.calibration_fraction``). The model never
trained on them and nothing selected them by score, so they score like the line's unseen parts;
the statistics (expected FRR, Clopper-Pearson upper bound) are in llb_edge.calibration.
``score >= threshold`` is NG on the line.

The previous rule, ``q99.5 + 0.25 * (q99.5 - q50)`` of the scores on the images the final model
trained on, stays as a candidate (and the fallback for runs without a calibration slice), but it
is biased low: the model has fitted those images, so they score lower than unseen normal parts
(demo: median 0.123 vs 0.163), and the fixed margin does not undo that (24% false rejects).

An operator tunes it on the line without re-exporting (``llb-edge bundle set-threshold``, with a
value or a target rate). With labelled validation images, :func:`f1max_threshold` offers the
threshold maximising image F1, and :func:`labelled_rates` measures FRR and escape rate.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llb_edge import metrics
from llb_edge.calibration import DEFAULT_CALIBRATION_OUTLIER_Z, DEFAULT_TARGET_FRR, threshold_for_target

log = logging.getLogger(__name__)

DEFAULT_QUANTILE = 0.995
DEFAULT_MARGIN = 0.25
METHOD_CALIBRATED = "calibrated"
METHOD_QUANTILE = "quantile"
METHOD_F1MAX = "f1max"
METHODS = (METHOD_CALIBRATED, METHOD_QUANTILE, METHOD_F1MAX)


@dataclass(frozen=True)
class ThresholdChoice:
    value: float
    method: str  # one of METHODS
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


def calibrated_threshold(
    scores: np.ndarray | list[float],
    target_frr: float = DEFAULT_TARGET_FRR,
    outlier_z: float | None = DEFAULT_CALIBRATION_OUTLIER_Z,
) -> ThresholdChoice:
    """The conformal threshold for ``target_frr`` on held-back calibration scores, the slice's outliers
    (suspected unlabelled defects, llb_edge.calibration) left out first."""
    estimate = threshold_for_target([float(v) for v in np.asarray(scores).reshape(-1)], target_frr,
                                    outlier_z=outlier_z)
    if estimate.excluded:
        log.warning("%d of %d calibration images score more than %g robust sigmas above the slice's median "
                    "(above %.4g): left out of the calibration as suspected defects. If they are normal parts, "
                    "the false-reject rate can reach %.3g (95%% bound) instead of %.3g; look at them "
                    "(calibration_scores.json of the run).", estimate.excluded, estimate.calibration_count,
                    outlier_z, estimate.outlier_cut, estimate.upper_if_normal, estimate.upper)
    if not estimate.reachable:
        log.warning("a %.3g%% false-reject rate needs more than %d calibration images; the threshold sits above "
                    "all of them, for an expected rate of %.3g%%", 100 * target_frr,
                    estimate.calibration_count - estimate.excluded, 100 * estimate.expected)
    excluded = f", {estimate.excluded} outliers left out" if estimate.excluded else ""
    description = (f"conformal: false-reject target {target_frr:g} on {estimate.calibration_count} held-back "
                   f"calibration images{excluded} (expected {estimate.expected:.3g}, {estimate.confidence:.0%} "
                   f"upper bound {estimate.upper:.3g})")
    return ThresholdChoice(value=estimate.threshold, method=METHOD_CALIBRATED, description=description,
                           details=estimate.to_dict())


def labelled_rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """Measured false-reject rate (normal scored NG) and escape rate (anomalous scored OK) at ``threshold``."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    normal, anomalous = scores[labels == 0], scores[labels == 1]
    return {
        "threshold": float(threshold),
        "normal": int(len(normal)),
        "anomalous": int(len(anomalous)),
        "false_rejects": int(np.sum(normal >= threshold)),
        "escapes": int(np.sum(anomalous < threshold)),
        "false_reject_rate": float(np.mean(normal >= threshold)) if len(normal) else None,
        "escape_rate": float(np.mean(anomalous < threshold)) if len(anomalous) else None,
    }


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


def read_calibration_scores(run_dir: str | Path) -> tuple[np.ndarray | None, str | None]:
    """(the final model's scores on the run's held-back calibration slice, its source: training | kept),
    (None, None) for runs without one."""
    from llb_edge.runs import CALIBRATION_SCORES

    path = Path(run_dir) / CALIBRATION_SCORES
    if not path.is_file():
        return None, None
    record = json.loads(path.read_text())
    raw = record.get("scores") or {}
    return (np.asarray(list(raw.values()), dtype=np.float64) if raw else None), record.get("source")


def quantile_rule(run_dir: str | Path, margin: float = DEFAULT_MARGIN) -> ThresholdChoice:
    """The training-score quantile rule for a run: from raw training scores when recorded, else from the stats."""
    scores, stats = read_train_scores(run_dir)
    if scores is not None:
        return quantile_threshold(scores, DEFAULT_QUANTILE, margin)
    return stats_threshold(stats, margin)
