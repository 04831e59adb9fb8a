"""The calibrated threshold and its false-reject statistics, pinned on crafted score sets.

Reference values were computed independently with scipy (stats.beta.ppf, stats.binom.isf).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from llb_edge.calibration import (
    DEFAULT_CALIBRATION_OUTLIER_Z,
    CalibrationError,
    RobustScale,
    binomial_alarm_count,
    bundle_calibration_scores,
    bundle_outlier_z,
    clopper_pearson_upper,
    estimate_frr,
    minimum_calibration_count,
    threshold_for_target,
)
from llb_edge.config import TrainConfig
from llb_edge.trainer.pipeline import calibration_count, calibration_split


def test_conformal_threshold_on_a_known_score_set() -> None:
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 100.0))  # 1..99, shuffled
    estimate = threshold_for_target(scores, 0.05)
    # k = ceil((99 + 1) * 0.95) = 95: the threshold sits just above the 95th smallest score, so 95 is OK.
    assert estimate.threshold == math.nextafter(95.0, math.inf)
    assert (estimate.calibration_count, estimate.calibration_rejects) == (99, 4)
    assert estimate.expected == pytest.approx(5 / 100)
    assert estimate.upper == pytest.approx(0.09007355819196766, rel=1e-9)  # beta.ppf(0.95, 5, 95)
    assert estimate.target == 0.05 and estimate.reachable


def test_one_percent_target() -> None:
    estimate = threshold_for_target(np.arange(1.0, 200.0), 0.01)  # n = 199: k = ceil(200 * 0.99) = 198
    assert estimate.threshold == math.nextafter(198.0, math.inf)
    assert estimate.calibration_rejects == 1 and estimate.expected == pytest.approx(0.01)
    assert estimate.upper == pytest.approx(0.02361544364196703, rel=1e-9)  # beta.ppf(0.95, 2, 198)


def test_unreachable_target_sits_above_every_score_and_says_so() -> None:
    estimate = threshold_for_target([0.3, 0.1, 0.2], 0.01)
    assert estimate.threshold == math.nextafter(0.3, math.inf) and not estimate.reachable
    assert estimate.calibration_rejects == 0 and estimate.expected == pytest.approx(1 / 4)
    assert estimate.upper == pytest.approx(1 - 0.05 ** (1 / 3))  # Clopper-Pearson with no failure
    assert minimum_calibration_count(0.01) == 99 and minimum_calibration_count(0.05) == 19
    assert threshold_for_target(np.arange(99.0), 0.01).reachable


def test_ties_at_the_threshold_stay_ok() -> None:
    estimate = threshold_for_target([1.0] * 50, 0.1)
    assert estimate.threshold > 1.0 and estimate.calibration_rejects == 0


def test_estimate_at_any_threshold() -> None:
    scores = list(np.arange(1.0, 100.0))
    estimate = estimate_frr(scores, 90.0)  # 90..99 are rejected: x = 10
    assert estimate.calibration_rejects == 10 and estimate.expected == pytest.approx(11 / 100)
    assert estimate.upper == pytest.approx(0.16531105635555599, rel=1e-9)  # beta.ppf(0.95, 11, 89)
    assert estimate.target is None
    assert estimate_frr(scores, 0.0).upper == 1.0


def test_clopper_pearson_reference_values() -> None:
    assert clopper_pearson_upper(0, 46) == pytest.approx(1 - 0.05 ** (1 / 46))
    assert clopper_pearson_upper(3, 20, 0.99) == pytest.approx(0.4207289171258154, rel=1e-9)  # beta.ppf(.99, 4, 17)


def test_binomial_alarm_count_reference_values() -> None:
    assert binomial_alarm_count(500, 0.01, 0.001) == 14  # binom.isf(0.001, 500, 0.01) = 13
    assert binomial_alarm_count(20, 0.01, 0.01) == 3
    assert binomial_alarm_count(100, 0.0, 0.001) == 1  # any NG is improbable at rate 0


def test_bad_inputs_are_refused() -> None:
    for scores, target in (([], 0.01), ([0.1, float("nan")], 0.01), ([0.1], 0.0), ([0.1], 1.0)):
        with pytest.raises(CalibrationError):
            threshold_for_target(scores, target)
    with pytest.raises(CalibrationError):
        bundle_calibration_scores({"calibration": {"scores": [0.1, "x"]}})
    assert bundle_calibration_scores({}) is None
    assert bundle_calibration_scores({"calibration": {"scores": [0.2, 0.1]}}) == [0.2, 0.1]


def test_calibration_slice_of_the_kept_images() -> None:
    assert calibration_count(300, 0.15, 20) == 45
    assert calibration_count(60, 0.15, 20) == 20  # the minimum
    assert calibration_count(24, 0.15, 20) == 12  # never more than half
    assert calibration_count(300, 0.0, 20) == 0
    kept = np.arange(0, 600, 2)
    train, held = calibration_split(kept, TrainConfig(seed=3))
    assert len(held) == 45 and len(train) == 255
    assert not set(train) & set(held) and set(train) | set(held) == set(kept)
    again_train, again_held = calibration_split(kept, TrainConfig(seed=3))
    assert np.array_equal(held, again_held) and np.array_equal(train, again_train)
    assert not np.array_equal(held, calibration_split(kept, TrainConfig(seed=4))[1])


def test_robust_scale_ignores_the_contaminated_upper_tail():
    clean = np.random.default_rng(0).normal(1.0, 0.1, 400)
    dirty = np.concatenate([clean, np.full(100, 5.0)])  # 20% far outliers
    robust = RobustScale.of(dirty)
    # The half-normal estimate from below the median stays near sigma; the plain std explodes.
    assert robust.scale == pytest.approx(0.1, rel=0.25) and dirty.std() > 1.0
    assert robust.z(robust.median + 3 * robust.scale) == pytest.approx(3.0)


def test_unlabelled_defects_in_the_slice_are_left_out_of_the_threshold() -> None:
    # 95 normal parts and 5 defects far above them; a 5% target on all 100 (k = ceil(101 * 0.95) = 96)
    # would put the threshold among the defects, and every defect of that kind would pass.
    normal = np.random.default_rng(3).permutation(np.linspace(0.8, 1.2, 95))
    defects = np.array([3.0, 3.5, 4.0, 4.5, 5.0])
    scores = np.concatenate([normal, defects])
    plain = threshold_for_target(scores, 0.05, outlier_z=None)
    assert plain.threshold > 3.0 and plain.excluded == 0
    cut = threshold_for_target(scores, 0.05)
    assert cut.excluded == 5 and normal.max() < cut.outlier_cut < 3.0
    # The conformal rank is taken among the 95 inliers: k = ceil(96 * 0.95) = 92nd smallest normal score.
    assert cut.threshold == math.nextafter(float(np.sort(normal)[91]), math.inf)
    assert cut.calibration_count == 100 and cut.calibration_rejects == 3
    assert cut.expected == pytest.approx(4 / 96)
    assert cut.upper == pytest.approx(clopper_pearson_upper(3, 95))
    # Were the five normal parts after all, all of them would be false rejects too.
    assert cut.upper_if_normal == pytest.approx(clopper_pearson_upper(8, 100))


def test_a_clean_slice_loses_almost_nothing_to_the_outlier_cut() -> None:
    scores = np.random.default_rng(4).normal(1.0, 0.1, 400)
    estimate = threshold_for_target(scores, 0.05)
    assert estimate.excluded <= 4  # a Gaussian tail beyond 2.5 sigma is ~0.6%
    assert estimate.threshold == pytest.approx(threshold_for_target(scores, 0.05, outlier_z=None).threshold, rel=0.02)


def test_estimate_at_any_threshold_counts_outliers_only_in_the_bound_if_normal() -> None:
    scores = [*np.linspace(1.0, 2.0, 40), 10.0, 11.0]
    low = estimate_frr(scores, 1.5)  # 20 inliers at or above 1.5 (1.5128.. upward), both outliers above it
    assert low.excluded == 2 and low.calibration_rejects == 20
    assert low.upper_if_normal == pytest.approx(clopper_pearson_upper(22, 42))
    high = estimate_frr(scores, 10.5)  # between the outliers: one of them would be a false reject
    assert high.calibration_rejects == 0 and high.upper_if_normal == pytest.approx(clopper_pearson_upper(1, 42))
    assert estimate_frr(scores, 10.5, outlier_z=None).calibration_rejects == 1


def test_bundle_records_which_outlier_cut_its_calibration_used() -> None:
    # Exported before the cut existed: re-calibrated as a new export would.
    assert bundle_outlier_z({}) == DEFAULT_CALIBRATION_OUTLIER_Z
    assert bundle_outlier_z({"calibration": {"scores": [0.1], "outlier_z": 3}}) == 3.0
    assert bundle_outlier_z({"calibration": {"scores": [0.1], "outlier_z": None}}) is None
    for bad in (0, -1, "2.5", True):
        with pytest.raises(CalibrationError, match="outlier_z"):
            bundle_outlier_z({"calibration": {"scores": [0.1], "outlier_z": bad}})
