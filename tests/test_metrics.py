"""Tests for llb_edge.metrics: hand-computed cases, brute-force cross-checks, streaming bounds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from llb_edge.metrics import (
    PixelMetrics,
    aupro_exact,
    f1max_threshold,
    image_metrics,
    top_fraction_mean,
)

# --------------------------------------------------------------------------------------------------
# independent brute-force references (slow, tiny inputs only)
# --------------------------------------------------------------------------------------------------


def brute_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_ap_f1(scores, labels):
    """AP (sklearn step sum) and F1max with its highest threshold, one threshold at a time."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    ap, prev_r, best, best_t = 0.0, 0.0, -1.0, None
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tp = np.sum(pred & labels)
        prec, rec = tp / pred.sum(), tp / labels.sum()
        ap += (rec - prev_r) * prec
        prev_r = rec
        f1 = 0.0 if tp == 0 else 2 * prec * rec / (prec + rec)
        if f1 > best:
            best, best_t = f1, t
    return ap, best, best_t


def flood_regions(mask):
    """8-connected components by breadth-first search (independent of cv2)."""
    lab = np.zeros(mask.shape, int)
    n = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if lab[start]:
            continue
        n += 1
        lab[start] = n
        todo = [start]
        while todo:
            r, c = todo.pop()
            for dr, dc in itertools.product((-1, 0, 1), repeat=2):
                rr, cc = r + dr, c + dc
                inside = 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1]
                if inside and mask[rr, cc] and not lab[rr, cc]:
                    lab[rr, cc] = n
                    todo.append((rr, cc))
    return lab, n


def brute_aupro(maps, masks, fpr_limit=0.3):
    """Per-threshold PRO as the plain mean of per-region overlap fractions; np.interp at the limit."""
    regions = []  # (image index, boolean region mask)
    for i, g in enumerate(masks):
        lab, n = flood_regions(g)
        regions += [(i, lab == k) for k in range(1, n + 1)]
    neg = ~masks
    xs, ys = [0.0], [0.0]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        pred = maps >= t
        xs.append(np.sum(pred & neg) / neg.sum())
        ys.append(np.mean([pred[i][r].mean() for i, r in regions]))
    xs, ys = np.array(xs), np.array(ys)
    keep = xs <= fpr_limit
    # the curve value at the limit on the segment that crosses it
    j = int(np.argmax(~keep))
    y_lim = ys[j - 1] + (ys[j] - ys[j - 1]) * (fpr_limit - xs[j - 1]) / (xs[j] - xs[j - 1])
    x = np.append(xs[keep], fpr_limit)
    y = np.append(ys[keep], y_lim)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit)


def random_masks(rng, b, h, w, p_empty=0.3):
    """Masks with a few random rectangles per image (some touch diagonally or merge), some empty."""
    masks = np.zeros((b, h, w), bool)
    for i in range(b):
        if rng.random() < p_empty:
            continue
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, h - 2), rng.integers(0, w - 2)
            masks[i, r : r + rng.integers(1, h // 3), c : c + rng.integers(1, w // 3)] = True
    masks[0, 0, 0] = True  # guarantee at least one defect pixel
    return masks


# --------------------------------------------------------------------------------------------------
# image level
# --------------------------------------------------------------------------------------------------


def test_image_perfect_and_inverted():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    m = image_metrics(scores, labels)
    assert m["i_auroc"] == 1.0 and m["i_ap"] == 1.0 and m["i_f1max"] == 1.0
    assert m["f1max_threshold"] == 0.8
    assert image_metrics(-scores, labels)["i_auroc"] == 0.0


def test_image_hand_computed_with_tie():
    scores = np.array([0.1, 0.4, 0.4, 0.8])
    labels = np.array([0, 0, 1, 1])
    m = image_metrics(scores, labels)
    # AUROC, pairs (pos, neg): (0.4,0.1)=1, (0.4,0.4)=1/2 tie, (0.8,0.1)=1, (0.8,0.4)=1 -> 3.5/4
    assert m["i_auroc"] == pytest.approx(0.875, abs=1e-12)
    # AP: t=0.8 -> P=1, R=1/2; t=0.4 (two samples enter together) -> P=2/3, R=1; t=0.1 no recall step
    #     AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert m["i_ap"] == pytest.approx(5 / 6, abs=1e-12)
    # F1: t=0.8 -> 2*1*.5/1.5 = 2/3; t=0.4 -> 2*(2/3)*1/(5/3) = 0.8; t=0.1 -> 2*.5*1/1.5 = 2/3
    assert m["i_f1max"] == pytest.approx(0.8, abs=1e-12)
    assert m["f1max_threshold"] == 0.4
    assert f1max_threshold(scores, labels) == 0.4


def test_image_hand_computed_f1_interior_and_bool_labels():
    scores = [0.95, 0.9, 0.7, 0.6, 0.5, 0.3, 0.2]
    labels = [True, False, True, True, False, False, True]
    m = image_metrics(scores, labels)
    # Positives 0.95, 0.7, 0.6, 0.2 vs negatives 0.9, 0.5, 0.3: wins 3 + 2 + 2 + 0 = 7 of 12
    assert m["i_auroc"] == pytest.approx(7 / 12, abs=1e-12)
    # Recall steps of 1/4 at t=0.95 (P=1), 0.7 (P=2/3), 0.6 (P=3/4), 0.2 (P=4/7)
    assert m["i_ap"] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 7) / 4, abs=1e-12)
    # F1 = 2TP/(TP+FP+P): .95 -> 2/5, .9 -> 2/6, .7 -> 4/7, .6 -> 6/8, .5 -> 6/9, .3 -> 6/10, .2 -> 8/11
    assert m["i_f1max"] == pytest.approx(0.75, abs=1e-12)
    assert m["f1max_threshold"] == 0.6


def test_image_tied_f1_returns_highest_threshold():
    # F1 = 2TP/(TP+FP+P), P=2: t=0.9 -> 2/3; t=0.5 -> 4/6 = 2/3 as well; t=0.1 -> 4/7.
    # The higher of the two equally good thresholds wins.
    assert f1max_threshold([0.9, 0.5, 0.5, 0.5, 0.1], [1, 1, 0, 0, 0]) == 0.9


def test_image_matches_brute_force_random_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(4, 40))
        scores = rng.integers(0, 6, n) / 5.0  # many ties
        labels = rng.random(n) < 0.4
        labels[:2] = [True, False]
        m = image_metrics(scores, labels)
        ap, f1, t = brute_ap_f1(scores, labels)
        assert m["i_auroc"] == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
        assert m["i_ap"] == pytest.approx(ap, abs=1e-12)
        assert m["i_f1max"] == pytest.approx(f1, abs=1e-12)
        assert m["f1max_threshold"] == t


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, 0.2], [1, 1], "only one class"),
        ([0.1, 0.2], [0, 0], "only one class"),
        ([0.1, 0.2, 0.3], [0, 1], "differ in length"),
        ([0.1, float("nan")], [0, 1], "NaN"),
        ([0.1, 0.2], [0, 2], "binary"),
        ([], [], "empty"),
    ],
)
def test_image_errors(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        image_metrics(scores, labels)
    with pytest.raises(ValueError, match=match):
        f1max_threshold(scores, labels)


# --------------------------------------------------------------------------------------------------
# pixel level
# --------------------------------------------------------------------------------------------------


def two_region_case():
    """4x4 map: region A (2 px, column 0) and region B (4 px, columns 2-3), 10 normal pixels.

    Values by threshold, high to low (predict value >= t), curve points (FPR, PRO):
      t=0.90  A 2/2, B 0/4          -> (0.0, 0.5)
      t=0.85  + 1 normal            -> (0.1, 0.5)
      t=0.80  B 2/4                 -> (0.1, 0.75)
      t=0.50  + 1 normal            -> (0.2, 0.75)
      t=0.40  + 2 normal, B 3/4     -> (0.4, 0.875)   crosses FPR 0.3: PRO(0.3) = 0.8125
      ...
    Area to 0.3: 0.1*0.5 + 0.1*0.75 + 0.1*(0.75+0.8125)/2 = 0.203125; AUPRO = 0.203125/0.3.
    """
    g = np.zeros((4, 4), bool)
    g[0:2, 0] = True  # A
    g[0:2, 2:4] = True  # B; column 1 keeps it apart from A even under 8-connectivity
    m = np.zeros((4, 4))
    m[0:2, 0] = 0.9
    m[0, 2:4] = 0.8
    m[1, 2], m[1, 3] = 0.4, 0.1
    m[0, 1], m[1, 1], m[2, 0], m[2, 1], m[2, 2] = 0.85, 0.5, 0.4, 0.4, 0.2
    return m, g


def test_aupro_two_regions_by_hand():
    m, g = two_region_case()
    expected = 0.203125 / 0.3
    assert aupro_exact(m, g) == pytest.approx(expected, abs=1e-12)
    assert brute_aupro(m[None], g[None]) == pytest.approx(expected, abs=1e-12)
    pm = PixelMetrics(lo=0.0, hi=1.0, bins=1000)
    pm.update(m, g)
    assert pm.n_regions == 2
    assert pm.compute()["aupro"] == pytest.approx(expected, abs=1e-12)


def test_pixel_perfect_and_inverted():
    rng = np.random.default_rng(1)
    g = random_masks(rng, 4, 16, 16)
    perfect = np.where(g, 1.5, 0.2) + rng.random(g.shape) * 0.1
    pm = PixelMetrics()
    pm.update(perfect, g)
    r = pm.compute()
    assert r == {"p_auroc": 1.0, "p_ap": 1.0, "aupro": 1.0}
    assert aupro_exact(perfect, g) == 1.0
    pm = PixelMetrics()
    pm.update(-perfect + 2.0, g)
    r = pm.compute()
    assert r["p_auroc"] == 0.0 and r["aupro"] == 0.0
    assert aupro_exact(-perfect, g) == 0.0


def test_pixel_values_outside_range_clip_into_end_bins():
    g = np.zeros((8, 8), bool)
    g[2:4, 2:4] = True
    pm = PixelMetrics(lo=0.0, hi=2.0, bins=64)
    pm.update(np.where(g, 50.0, -3.0), g)
    assert pm.pos[-1] == 4 and pm.neg[0] == 60
    assert pm.compute() == {"p_auroc": 1.0, "p_ap": 1.0, "aupro": 1.0}
    pm = PixelMetrics(bins=64)
    pm.update(np.where(g, np.inf, -np.inf), g)
    assert pm.compute()["p_auroc"] == 1.0


def test_pixel_same_bin_counts_as_tie():
    g = np.zeros((4, 4), bool)
    g[0, 0] = True
    m = np.full((4, 4), 0.3)
    m[0, 0] = 0.7  # distinct values, but both in the single bin [0, 1) -> a tie
    pm = PixelMetrics(lo=0.0, hi=2.0, bins=2)
    pm.update(m, g)
    r = pm.compute()
    assert r["p_auroc"] == 0.5
    assert r["p_ap"] == pytest.approx(1 / 16)
    # all pixels enter at once: curve (0,0) -> (1,1), area to 0.3 = 0.045, normalised 0.15
    assert r["aupro"] == pytest.approx(0.15)


def test_eight_connectivity():
    g = np.zeros((5, 5), bool)
    g[0, 0] = g[1, 1] = g[2, 2] = True  # one diagonal region of 3 pixels
    g[4, 4] = True  # a separate 1-pixel region
    m = np.zeros((5, 5))
    m[0, 0] = m[4, 4] = 1.0  # detects 1/3 of the diagonal and all of the single pixel
    pm = PixelMetrics(lo=0.0, hi=1.0, bins=100)
    pm.update(m, g)
    assert pm.n_regions == 2
    np.testing.assert_allclose(pm.pos_w.sum(), 2.0)
    # PRO jumps to (1/3 + 1)/2 at FPR 0 and stays there until every pixel enters at FPR 1
    a, b = 2 / 3, 1.0
    expected = (a * 0.3 + (b - a) * 0.3 * 0.3 / 2) / 0.3
    assert pm.compute()["aupro"] == pytest.approx(expected, abs=1e-12)
    assert aupro_exact(m, g) == pytest.approx(expected, abs=1e-12)


def test_aupro_exact_matches_brute_force():
    rng = np.random.default_rng(2)
    for _ in range(3):
        g = random_masks(rng, 3, 10, 10)
        m = np.round(rng.random(g.shape) + 0.5 * g, 1)  # coarse values -> ties between classes
        for limit in (0.3, 0.05, 1.0):
            assert aupro_exact(m, g, limit) == pytest.approx(brute_aupro(m, g, limit), abs=1e-12)


def test_streaming_equals_exact_on_grid_values():
    """Values on a 1/1000 grid fall into distinct bins, so binning is exact (up to float rounding)."""
    rng = np.random.default_rng(3)
    g = random_masks(rng, 12, 32, 32)
    # Shift in integers before dividing so that equal grid points are equal floats.
    m = (rng.integers(0, 1000, g.shape) + 300 * g) / 1000.0
    pm = PixelMetrics()
    for i in range(0, 12, 5):  # uneven batches, last one smaller
        pm.update(m[i : i + 5], g[i : i + 5])
    r = pm.compute()
    ref = image_metrics(m.ravel(), g.ravel())
    assert r["p_auroc"] == pytest.approx(ref["i_auroc"], abs=1e-10)
    assert r["p_ap"] == pytest.approx(ref["i_ap"], abs=1e-10)
    assert r["aupro"] == pytest.approx(aupro_exact(m, g), abs=1e-10)


def test_streaming_close_to_exact_on_continuous_values():
    rng = np.random.default_rng(4)
    g = random_masks(rng, 10, 48, 48)
    m = (rng.random(g.shape) + 0.4 * g).astype(np.float32)
    pm = PixelMetrics()
    for i in range(10):
        pm.update(m[i], g[i])  # one [H,W] map at a time
    r = pm.compute()
    ref = image_metrics(m.ravel(), g.ravel())
    assert r["p_auroc"] == pytest.approx(ref["i_auroc"], abs=1e-4)
    assert r["p_ap"] == pytest.approx(ref["i_ap"], abs=1e-4)
    for limit in (0.3, 0.1):
        pm.fpr_limit = limit
        assert pm.compute()["aupro"] == pytest.approx(aupro_exact(m, g, limit), abs=1e-4)


def test_memory_bounded_over_many_updates():
    rng = np.random.default_rng(5)
    pm = PixelMetrics()

    def nbytes():
        return sum(v.nbytes for v in vars(pm).values() if isinstance(v, np.ndarray))

    before = nbytes()
    assert before == 3 * 8 * (1 << 20)
    for _ in range(200):
        g = random_masks(rng, 1, 64, 64)
        pm.update(rng.random((1, 64, 64)) + g, g)
    assert nbytes() == before
    assert int(pm.pos.sum() + pm.neg.sum()) == 200 * 64 * 64
    r = pm.compute()
    assert 0.5 < r["p_auroc"] <= 1.0
    pm.reset()
    assert nbytes() == before and pm.n_regions == 0 and not pm.pos.any()


def test_pixel_errors():
    pm = PixelMetrics()
    with pytest.raises(ValueError, match="differ in shape"):
        pm.update(np.zeros((2, 4, 4)), np.zeros((2, 4, 5), bool))
    with pytest.raises(ValueError, match="NaN"):
        pm.update(np.full((4, 4), np.nan), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="bool"):
        pm.update(np.zeros((4, 4)), np.full((4, 4), 3))
    with pytest.raises(ValueError, match=r"\[H,W\] or \[B,H,W\]"):
        pm.update(np.zeros(4), np.zeros(4, bool))
    with pytest.raises(ValueError, match="both defect and normal"):
        pm.compute()
    pm.update(np.zeros((4, 4)), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="both defect and normal"):
        pm.compute()
    with pytest.raises(ValueError, match="lo < hi"):
        PixelMetrics(lo=1.0, hi=1.0)
    with pytest.raises(ValueError, match="fpr_limit"):
        PixelMetrics(fpr_limit=0.0)
    with pytest.raises(ValueError, match="both defect and normal"):
        aupro_exact(np.zeros((4, 4)), np.ones((4, 4), bool))


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def test_top_fraction_mean():
    m = np.arange(100, dtype=np.float32).reshape(10, 10)
    assert top_fraction_mean(m, 0.05) == pytest.approx(np.mean([95, 96, 97, 98, 99]))
    assert top_fraction_mean(m, 0.001) == 99.0  # floor(0.1) = 0 -> at least one pixel
    assert top_fraction_mean(m, 0.29) == pytest.approx(np.arange(71, 100).mean())  # 29 px, not 28
    batch = np.stack([m, m[::-1] * 2])
    np.testing.assert_allclose(top_fraction_mean(batch, 0.02), [98.5, 197.0])
    rng = np.random.default_rng(6)
    big = rng.random((256, 256))
    assert top_fraction_mean(big) == pytest.approx(np.sort(big.ravel())[-655:].mean(), abs=1e-12)
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_mean(m, 0.0)
