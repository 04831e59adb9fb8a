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

**Unlabelled defects in the slice.** The slice is a random draw from the training set, so a dirty set
puts defects in it too, and they score high: with a target below the set's defect rate the
order statistic lands among them and the threshold passes most defects (the demo before this rule:
91 of 95). The slice's outliers are therefore left out first, by the rule LLB's automatic cut
uses on the consensus scores (:class:`RobustScale`: more than ``outlier_z`` robust standard
deviations above the median, the scale taken from the scores below the median, which defects do
not reach), set further out (``DEFAULT_CALIBRATION_OUTLIER_Z``). ``expected`` and ``upper`` then
treat the excluded images as defects; ``upper_if_normal`` is the bound if they were all normal
parts after all (they are all above the threshold, so they would all be false rejects).

The daemon's drift check uses the same binomial law: :func:`binomial_alarm_count` is the NG count
in a window of frames that an expected rate ``p`` produces with probability below ``alpha``.

Pure Python (no numpy), so the runtime and the exporters share it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from llb_edge.errors import LLBEdgeError

DEFAULT_TARGET_FRR = 0.01
DEFAULT_CONFIDENCE = 0.95
# How far above the slice's median (in robust standard deviations, RobustScale) a calibration score is
# left out as a suspected defect (train.calibration_outlier_z). Further out than LLB's screening cut
# (llb.outlier_z, 2.5) because a mistake costs more here: a suspect wrongly masked in stage 2 costs a
# few patches of training signal, a normal part wrongly left out of the calibration lowers the threshold
# and breaks the false-reject promise. Good parts' scores are skewed to the right, and at 2.5 the cut
# took 2-7 of 100 normal MTD calibration images and ran the false-reject rate to 8-9% for a 5% target;
# at 3.5 it takes 0-2 and still removes the demo's defective cells (docs/bundle.md).
DEFAULT_CALIBRATION_OUTLIER_Z = 3.5


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
class RobustScale:
    """Median and a contamination-proof standard deviation of a score distribution.

    The scale is the root mean square distance to the median of the scores at or below it (the
    half-normal estimate of sigma): unlabelled defects only ever raise scores, so the lower half is
    the clean side. A plain MAD counts the contaminated upper tail and widens with it.
    """

    median: float
    scale: float

    @classmethod
    def of(cls, values: Iterable[float]) -> RobustScale:
        ordered = sorted(float(v) for v in values)
        if not ordered:
            raise CalibrationError("no scores to estimate a median and scale from")
        median = statistics.median(ordered)
        lower = [v for v in ordered if v <= median]
        scale = math.sqrt(sum((v - median) ** 2 for v in lower) / len(lower))
        return cls(median, scale if scale > 0 else sys.float_info.min)

    def z(self, value: float) -> float:
        return (value - self.median) / self.scale

    def above(self, z: float) -> float:
        """The score ``z`` robust standard deviations above the median."""
        return self.median + z * self.scale


def split_outliers(scores: Iterable[float], outlier_z: float | None) -> tuple[list[float], list[float], float | None]:
    """(scores at or below the outlier cut, scores above it, the cut), each list ascending.

    ``outlier_z`` None keeps every score (no cut).
    """
    values = _checked(scores)
    if outlier_z is None:
        return values, [], None
    if not outlier_z > 0:
        raise CalibrationError(f"outlier_z must be > 0, got {outlier_z}")
    cut = RobustScale.of(values).above(outlier_z)
    return [v for v in values if v <= cut], [v for v in values if v > cut], cut


@dataclass(frozen=True)
class FalseRejectEstimate:
    """What the calibration set says about the false-reject rate at one threshold."""

    threshold: float
    calibration_count: int  # n, every calibration score
    calibration_rejects: int  # x: scores at or below the outlier cut that are >= threshold
    expected: float  # (x + 1) / (n - m + 1): the m excluded outliers taken as defects
    upper: float  # one-sided Clopper-Pearson bound at ``confidence`` for x of n - m
    confidence: float
    target: float | None = None  # the target it was chosen for, when it was
    reachable: bool = True  # False: the target needs more calibration images than there are
    excluded: int = 0  # m: scores above the outlier cut, left out as suspected defects
    outlier_z: float | None = None  # the cut's distance above the median in robust sigmas; None: no cut
    outlier_cut: float | None = None
    upper_if_normal: float | None = None  # the bound if the excluded images were normal parts after all

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
    scores: Iterable[float], threshold: float, confidence: float = DEFAULT_CONFIDENCE,
    outlier_z: float | None = DEFAULT_CALIBRATION_OUTLIER_Z,
) -> FalseRejectEstimate:
    """The expected false-reject rate and its upper bound at ``threshold`` (any threshold, however chosen).

    Scores above the outlier cut (module docstring) count as defects; ``upper_if_normal`` counts
    those at or above ``threshold`` as false rejects instead.
    """
    return _estimate(*split_outliers(scores, outlier_z), threshold, confidence, outlier_z)


def _estimate(
    inliers: list[float], outliers: list[float], cut: float | None, threshold: float, confidence: float,
    outlier_z: float | None,
) -> FalseRejectEstimate:
    n = len(inliers) + len(outliers)
    rejects = sum(1 for v in inliers if v >= threshold)
    outlier_rejects = sum(1 for v in outliers if v >= threshold)
    return FalseRejectEstimate(
        threshold=float(threshold), calibration_count=n, calibration_rejects=rejects,
        expected=(rejects + 1) / (len(inliers) + 1), upper=clopper_pearson_upper(rejects, len(inliers), confidence),
        confidence=confidence, excluded=len(outliers), outlier_z=outlier_z, outlier_cut=cut,
        upper_if_normal=clopper_pearson_upper(rejects + outlier_rejects, n, confidence),
    )


def minimum_calibration_count(target_frr: float) -> int:
    """Calibration images needed before ``target_frr`` is reachable: (x + 1) / (n + 1) <= target at x = 0."""
    return max(1, math.ceil(1.0 / target_frr) - 1)


def threshold_for_target(
    scores: Iterable[float], target_frr: float, confidence: float = DEFAULT_CONFIDENCE,
    outlier_z: float | None = DEFAULT_CALIBRATION_OUTLIER_Z,
) -> FalseRejectEstimate:
    """The split-conformal threshold for ``target_frr`` and what it promises.

    The scores above the outlier cut are left out (module docstring). With the remaining n' scores
    sorted s_(1) <= ... <= s_(n') and k = ceil((n' + 1) * (1 - target)), the threshold sits just
    above s_(k), so s_(k) itself is OK. When k > n' the target is not reachable with n' images: the
    threshold then sits just above the largest remaining score and the estimate says what that gives
    (``reachable`` False).
    """
    if not 0.0 < target_frr < 1.0:
        raise CalibrationError(f"the target false-reject rate must be in (0, 1), got {target_frr}")
    inliers, outliers, cut = split_outliers(scores, outlier_z)
    n = len(inliers)
    rank = math.ceil((n + 1) * (1.0 - target_frr) - 1e-9)
    reachable = rank <= n
    threshold = math.nextafter(inliers[min(rank, n) - 1], math.inf)
    estimate = _estimate(inliers, outliers, cut, threshold, confidence, outlier_z)
    return dataclasses.replace(estimate, target=float(target_frr), reachable=reachable)


# bundle.json extra["calibration"]: {"source", "count", "scores" (sorted), "confidence", "outlier_z"}, written by
# the exporter.
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


def bundle_outlier_z(extra: dict[str, Any]) -> float | None:
    """The outlier cut a bundle's calibration used (``extra.calibration.outlier_z``; None: no cut).

    Bundles exported before the cut existed get the default, so a re-calibration on the line
    (``bundle set-threshold --target-frr``) leaves the slice's defects out as a new export would.
    """
    record = extra.get(BUNDLE_CALIBRATION_KEY)
    if not isinstance(record, dict) or "outlier_z" not in record:
        return DEFAULT_CALIBRATION_OUTLIER_Z
    value = record["outlier_z"]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise CalibrationError(f"bundle.json extra.calibration.outlier_z must be a number > 0 or null, got {value!r}")
    return float(value)
