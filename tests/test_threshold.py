"""The default threshold rule and the F1-max option, on inputs whose answer is known by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from llb_edge.exporters.threshold import (
    DEFAULT_MARGIN,
    METHOD_CALIBRATED,
    METHOD_F1MAX,
    METHOD_QUANTILE,
    calibrated_threshold,
    f1max_threshold,
    quantile_rule,
    quantile_threshold,
    read_calibration_scores,
    read_train_scores,
    stats_threshold,
)


def test_quantile_rule_on_known_scores() -> None:
    scores = np.arange(200, dtype=np.float64)  # 0..199
    choice = quantile_threshold(scores)
    # numpy's linear quantile: q99.5 at position 0.995 * 199 = 198.005, q50 at 99.5.
    expected = 198.005 + DEFAULT_MARGIN * (198.005 - 99.5)
    assert choice.value == pytest.approx(expected, abs=1e-9)
    assert choice.method == METHOD_QUANTILE
    assert choice.details["q_high"] == pytest.approx(198.005)
    assert choice.details["q50"] == pytest.approx(99.5)
    assert choice.details["count"] == 200
    assert "q99.5" in choice.description and "0.25" in choice.description


def test_rule_is_scale_free() -> None:
    # Scores have no common scale across encoders: scaling and shifting them moves the threshold alike.
    rng = np.random.default_rng(0)
    scores = rng.gamma(2.0, 0.05, size=300)
    base = quantile_threshold(scores).value
    assert quantile_threshold(scores * 10 + 3).value == pytest.approx(base * 10 + 3)


def test_threshold_is_above_every_typical_training_score() -> None:
    scores = np.random.default_rng(1).normal(0.1, 0.01, size=1000)
    value = quantile_threshold(scores).value
    assert np.mean(scores >= value) < 0.005
    # Gaussian: median + 1.25 * 2.576 sigma = 3.22 sigma above the median.
    assert value == pytest.approx(0.1 + 3.22 * 0.01, abs=0.004)


def test_identical_scores_stay_ok() -> None:
    # No spread: the threshold must still sit above the training scores (score >= threshold is NG).
    choice = quantile_threshold(np.full(10, 0.25))
    assert choice.value > 0.25
    assert choice.value == math.nextafter(0.25, math.inf)


def test_margin_zero_is_the_plain_quantile() -> None:
    scores = np.arange(200, dtype=np.float64)
    assert quantile_threshold(scores, margin=0.0).value == pytest.approx(198.005)


@pytest.mark.parametrize("bad", [np.array([]), np.array([0.1, np.nan]), np.array([0.1, np.inf])])
def test_bad_scores_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        quantile_threshold(bad)


def test_bad_parameters_refused() -> None:
    with pytest.raises(ValueError, match="quantile"):
        quantile_threshold(np.arange(5.0), quantile=0.3)
    with pytest.raises(ValueError, match="margin"):
        quantile_threshold(np.arange(5.0), margin=-1)


def test_stats_rule_matches_raw_rule() -> None:
    scores = np.arange(200, dtype=np.float64)
    stats = {"count": 200, "q50": float(np.quantile(scores, 0.5)), "q99.5": float(np.quantile(scores, 0.995))}
    assert stats_threshold(stats).value == pytest.approx(quantile_threshold(scores).value)
    with pytest.raises(ValueError, match="q99.5"):
        stats_threshold({"q50": 1.0})


def test_f1max_on_separable_scores() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    choice = f1max_threshold(scores, labels)
    # Predict anomalous for score >= t: t = 0.7 separates perfectly (the highest such threshold).
    assert choice.value == pytest.approx(0.7)
    assert choice.method == METHOD_F1MAX
    assert choice.details["f1"] == pytest.approx(1.0)
    assert choice.details["anomalous"] == 3


def test_f1max_with_overlap() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    # t=0.8: P=1, R=.5 -> F1 .667; t=0.4: TP1 FP1 -> .5; t=0.35: TP2 FP1 -> .8; t=0.1: TP2 FP2 -> .667.
    choice = f1max_threshold(scores, labels)
    assert choice.value == pytest.approx(0.35)
    assert choice.details["f1"] == pytest.approx(0.8)


def test_f1max_needs_both_classes() -> None:
    with pytest.raises(ValueError):
        f1max_threshold(np.array([0.1, 0.2]), np.array([0, 0]))


def test_default_threshold_of_a_run(tmp_path: Path) -> None:
    scores = {f"/img/{i}.png": float(i) for i in range(200)}
    (tmp_path / "train_scores.json").write_text(json.dumps({"stats": {"q50": 0.0, "q99.5": 0.0},
                                                            "scores": scores}))
    raw, stats = read_train_scores(tmp_path)
    assert raw is not None and len(raw) == 200
    # Raw scores win over recorded stats (the stats here are deliberately wrong).
    assert quantile_rule(tmp_path).value == pytest.approx(quantile_threshold(np.arange(200.0)).value)
    (tmp_path / "train_scores.json").write_text(json.dumps({"stats": {"q50": 1.0, "q99.5": 2.0, "count": 9}}))
    assert quantile_rule(tmp_path).value == pytest.approx(2.0 + DEFAULT_MARGIN * 1.0)
    assert read_calibration_scores(tmp_path) == (None, None)  # a run from before the calibration slice
    calibration = {f"/cal/{i}.png": float(i) for i in range(1, 100)}
    (tmp_path / "calibration_scores.json").write_text(json.dumps({"source": "training", "scores": calibration}))
    scores, source = read_calibration_scores(tmp_path)
    assert source == "training" and scores is not None
    choice = calibrated_threshold(scores, target_frr=0.05)
    assert choice.method == METHOD_CALIBRATED and choice.value == math.nextafter(95.0, math.inf)
    assert choice.details["expected"] == pytest.approx(0.05) and choice.details["reachable"]


def test_default_threshold_of_the_tiny_run(tiny_run: Path) -> None:
    values = json.loads((tiny_run / "train_scores.json").read_text())
    choice = quantile_rule(tiny_run)
    assert choice.value == pytest.approx(quantile_threshold(np.array(list(values["scores"].values()))).value)
    assert choice.value > values["stats"]["q99.5"]
    # The run held back a calibration slice of its kept images, never trained on.
    calibration = json.loads((tiny_run / "calibration_scores.json").read_text())["scores"]
    assert len(calibration) == 12 and not set(calibration) & set(values["scores"])
    recorded, source = read_calibration_scores(tiny_run)
    assert recorded is not None and sorted(recorded) == sorted(calibration.values()) and source == "training"
