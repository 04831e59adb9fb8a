"""The calibrated threshold and its false-reject statistics, pinned on crafted score sets.

Reference values were computed independently with scipy (stats.beta.ppf, stats.binom.isf).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from llb_edge.calibration import (
    CalibrationError,
    binomial_alarm_count,
    bundle_calibration_scores,
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
