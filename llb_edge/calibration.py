"""The false-reject rate a threshold gives, from normal images the model never trained on.

The trainer holds back a seeded slice of the training images (``train.calibration_fraction``)
and scores it with the final model; those scores are exchangeable with the scores of the line's
unseen parts, which is all the statistics below assume (docs/bundle.md).

For ``n`` calibration scores and a threshold ``t`` (``score >= t`` is NG) with ``x`` of them at or
above ``t``:

- expected false-reject rate: ``(x + 1) / (n + 1)``. For the threshold :func:`threshold_for_target`
  picks this is the split-conformal bound: the FRR of a new normal part, averaged over calibration
  sets, is at most this value;
- upper confidence bound: the one-sided Clopper-Pearson bound for ``x`` rejects out of ``n``. For an
  order-statistic threshold it equals the ``confidence`` quantile of the Beta(x + 1, n - x) law of
  the true rate, so with probability ``confidence`` over the calibration draw the line's FRR is below it.

The daemon's drift check uses the same binomial law: :func:`binomial_alarm_count` is the NG count
in a window of frames that an expected rate ``p`` produces with probability below ``alpha``.

Pure Python (no numpy), so the runtime and the exporters share it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from llb_edge.errors import LLBEdgeError

DEFAULT_TARGET_FRR = 0.01
DEFAULT_CONFIDENCE = 0.95


class CalibrationError(LLBEdgeError, ValueError):
    """Calibration scores or a target rate that cannot give a threshold."""


def _log_binomial_pmf(k: int, n: int, p: float) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binomial_cdf(x: int, n: int, p: float) -> float:
    """P(X <= x) for X ~ Binomial(n, p)."""
    if x < 0:
        return 0.0
    if x >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    return min(1.0, sum(math.exp(_log_binomial_pmf(k, n, p)) for k in range(x + 1)))


def clopper_pearson_upper(failures: int, trials: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on a rate with ``failures`` out of ``trials``."""
    if trials < 1 or not 0 <= failures <= trials:
        raise CalibrationError(f"need 0 <= failures <= trials and trials >= 1, got {failures} of {trials}")
    if not 0.0 < confidence < 1.0:
        raise CalibrationError(f"confidence must be in (0, 1), got {confidence}")
    if failures == trials:
        return 1.0
    alpha = 1.0 - confidence
    low, high = failures / trials, 1.0
    # binomial_cdf(failures, trials, p) falls as p grows: bisect for the p where it equals alpha.
    for _ in range(100):
        middle = (low + high) / 2
        if binomial_cdf(failures, trials, middle) > alpha:
            low = middle
        else:
            high = middle
    return high


@lru_cache(maxsize=256)
def binomial_alarm_count(window: int, rate: float, alpha: float) -> int:
    """Smallest count c with P(X >= c) <= alpha for X ~ Binomial(window, rate); window + 1 if none."""
    if window < 1 or not 0.0 <= rate <= 1.0 or not 0.0 < alpha < 1.0:
        raise CalibrationError(f"invalid alarm settings: window {window}, rate {rate}, alpha {alpha}")
    if rate == 0.0:
        return 1
    if rate == 1.0:
        return window + 1
    below = 0.0  # P(X < count), accumulated in one pass
    for count in range(window + 1):
        if 1.0 - below <= alpha:
            return count
        below += math.exp(_log_binomial_pmf(count, window, rate))
    return window + 1


@dataclass(frozen=True)
class FalseRejectEstimate:
    """What the calibration set says about the false-reject rate at one threshold."""

    threshold: float
    calibration_count: int  # n
    calibration_rejects: int  # x: calibration scores >= threshold
    expected: float  # (x + 1) / (n + 1)
    upper: float  # one-sided Clopper-Pearson bound at ``confidence``
    confidence: float
    target: float | None = None  # the target it was chosen for, when it was
    reachable: bool = True  # False: the target needs more calibration images than there are

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _checked(scores: Iterable[float]) -> list[float]:
    values = sorted(float(s) for s in scores)
    if not values:
        raise CalibrationError("no calibration scores: re-train with train.calibration_fraction > 0")
    if not all(math.isfinite(v) for v in values):
        raise CalibrationError("calibration scores contain NaN or inf; the model or its run is broken")
    return values


def estimate_frr(
    scores: Iterable[float], threshold: float, confidence: float = DEFAULT_CONFIDENCE
) -> FalseRejectEstimate:
    """The expected false-reject rate and its upper bound at ``threshold`` (any threshold, however chosen)."""
    values = _checked(scores)
    n = len(values)
    rejects = sum(1 for v in values if v >= threshold)
    return FalseRejectEstimate(
        threshold=float(threshold), calibration_count=n, calibration_rejects=rejects,
        expected=(rejects + 1) / (n + 1), upper=clopper_pearson_upper(rejects, n, confidence), confidence=confidence,
    )


def minimum_calibration_count(target_frr: float) -> int:
    """Calibration images needed before ``target_frr`` is reachable: (x + 1) / (n + 1) <= target at x = 0."""
    return max(1, math.ceil(1.0 / target_frr) - 1)


def threshold_for_target(
    scores: Iterable[float], target_frr: float, confidence: float = DEFAULT_CONFIDENCE
) -> FalseRejectEstimate:
    """The split-conformal threshold for ``target_frr`` and what it promises.

    With the calibration scores sorted s_(1) <= ... <= s_(n) and k = ceil((n + 1) * (1 - target)),
    the threshold sits just above s_(k), so s_(k) itself is OK. When k > n the target is not
    reachable with n images: the threshold then sits just above the largest score and the estimate
    says what that gives (``reachable`` False).
    """
    if not 0.0 < target_frr < 1.0:
        raise CalibrationError(f"the target false-reject rate must be in (0, 1), got {target_frr}")
    values = _checked(scores)
    n = len(values)
    rank = math.ceil((n + 1) * (1.0 - target_frr) - 1e-9)
    reachable = rank <= n
    threshold = math.nextafter(values[min(rank, n) - 1], math.inf)
    estimate = estimate_frr(values, threshold, confidence)
    return FalseRejectEstimate(**{**estimate.to_dict(), "target": float(target_frr), "reachable": reachable})


# bundle.json extra["calibration"]: {"source", "count", "scores" (sorted), "confidence"}, written by the exporter.
BUNDLE_CALIBRATION_KEY = "calibration"


def bundle_calibration_scores(extra: dict[str, Any]) -> list[float] | None:
    """The calibration scores a bundle carries (bundle.json ``extra.calibration.scores``), or None."""
    record = extra.get(BUNDLE_CALIBRATION_KEY)
    scores = record.get("scores") if isinstance(record, dict) else None
    if not isinstance(scores, list) or not scores:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in scores):
        raise CalibrationError("bundle.json extra.calibration.scores holds a value that is not a finite number")
    return [float(v) for v in scores]
