"""Evaluation metrics for anomaly inspection (method spec, section 6), in numpy only.

Image level (exact, sort based):

* :func:`image_metrics` gives ``i_auroc``, ``i_ap``, ``i_f1max`` and ``f1max_threshold``.
* :func:`f1max_threshold` gives just the threshold (the exporter uses it as a decision threshold).

Pixel level (streaming, memory bounded):

* :class:`PixelMetrics` accumulates histograms over a fixed value range and gives ``p_auroc``,
  ``p_ap`` and ``aupro`` in O(bins) memory whatever the number of test images.
* :func:`aupro_exact` is a small, non-streaming reference that thresholds at every distinct value.

Helper:

* :func:`top_fraction_mean` is the image score of section 5 (mean of the top 1% of a map's pixels).

Conventions shared by every function here:

* A sample (image or pixel) is predicted anomalous when its score is ``>= threshold``.
* Equal scores are ties: they enter or leave the predicted-positive set together, so AUROC counts a
  tied positive/negative pair as 1/2 (Mann-Whitney) and AP / F1 / PRO curves only have points at
  distinct scores. In :class:`PixelMetrics` "equal" means "in the same bin".
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = [
    "PixelMetrics",
    "aupro_exact",
    "f1max_threshold",
    "image_metrics",
    "top_fraction_mean",
]


# --------------------------------------------------------------------------------------------------
# image level
# --------------------------------------------------------------------------------------------------


def _check_scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return ``(scores float64 [n], labels bool [n])``; raise ValueError otherwise."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    lab = np.asarray(labels)
    if lab.dtype != np.bool_:
        lab_f = lab.astype(np.float64).reshape(-1)
        if np.isnan(lab_f).any():
            raise ValueError("labels contain NaN")
        if not np.isin(lab_f, (0.0, 1.0)).all():
            raise ValueError("labels must be binary (bool or 0/1); got other values")
        lab = lab_f == 1.0
    lab = lab.reshape(-1)
    if s.shape[0] != lab.shape[0]:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {lab.shape[0]}")
    if s.size == 0:
        raise ValueError("scores and labels are empty")
    if np.isnan(s).any():
        raise ValueError(f"scores contain {int(np.isnan(s).sum())} NaN value(s)")
    n_pos = int(lab.sum())
    if n_pos == 0 or n_pos == lab.size:
        only = "anomalous (1)" if n_pos else "normal (0)"
        msg = f"labels contain only one class ({only}, n={lab.size}); AUROC/AP/F1 need both classes"
        raise ValueError(msg)
    return s, lab


def _ranked_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative TP and FP counts at each distinct score, thresholds sorted from high to low.

    Returns ``(thresholds, tp, fp)``: predicting ``score >= thresholds[i]`` gives ``tp[i]`` true and
    ``fp[i]`` false positives. Each tie group yields one point.
    """
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    y = labels[order]
    # The last index of every tie group: where the next (lower) score differs, plus the very end.
    ends = np.flatnonzero(s[1:] != s[:-1])
    ends = np.append(ends, s.size - 1)
    tp = np.cumsum(y, dtype=np.float64)[ends]
    fp = (ends + 1).astype(np.float64) - tp
    return s[ends], tp, fp


def _auroc_from_curve(tp: np.ndarray, fp: np.ndarray) -> float:
    """Trapezoid area under (FPR, TPR) through the tie-group points; equals Mann-Whitney U/(P*N).

    A tie group adds ``dtp`` positives and ``dfp`` negatives at once; the trapezoid over that step
    counts those ``dtp*dfp`` pairs as 1/2 each, which is the Mann-Whitney tie convention.
    """
    p, n = tp[-1], fp[-1]
    tpr = np.concatenate(([0.0], tp / p))
    fpr = np.concatenate(([0.0], fp / n))
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) * 0.5))


def _ap_from_curve(tp: np.ndarray, fp: np.ndarray) -> float:
    """Step-sum AP (as sklearn ``average_precision_score``): sum of (R_i - R_{i-1}) * P_i."""
    recall = tp / tp[-1]
    precision = tp / (tp + fp)
    d_recall = np.diff(np.concatenate(([0.0], recall)))
    return float(np.sum(d_recall * precision))


def _f1max_from_curve(thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray) -> tuple[float, float]:
    """Maximum F1 over the tie-group thresholds and the (highest) threshold achieving it."""
    p = tp[-1]
    # F1 = 2PR/(P+R) = 2TP / (2TP + FP + FN) with FN = P - TP; the denominator is never 0 since P > 0.
    f1 = 2.0 * tp / (tp + fp + p)
    i = int(np.argmax(f1))  # first maximum in the high-to-low sweep = the highest such threshold
    return float(f1[i]), float(thresholds[i])


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Exact image-level metrics.

    Args:
        scores: image anomaly scores, shape ``[n]`` (any array-like; higher = more anomalous).
        labels: ground truth, shape ``[n]``, bool or 0/1 (1 = anomalous). Both classes must occur.

    Returns:
        ``{"i_auroc", "i_ap", "i_f1max", "f1max_threshold"}``:

        * ``i_auroc``: Mann-Whitney AUROC; a tied (anomalous, normal) pair counts 1/2.
        * ``i_ap``: average precision as sklearn's ``average_precision_score``: thresholds at each
          distinct score, ``sum_i (R_i - R_{i-1}) * P_i`` (no interpolation).
        * ``i_f1max``: max over those thresholds of ``2PR/(P+R)`` (0 where P+R = 0).
        * ``f1max_threshold``: a score ``t`` achieving ``i_f1max`` when predicting anomalous for
          ``score >= t``. It is always one of the given scores; when several thresholds reach the
          same maximum, the highest one is returned.

    Raises:
        ValueError: different lengths, empty input, NaN scores or labels, non-binary labels, or
            labels with only one class.
    """
    s, y = _check_scores_labels(scores, labels)
    thr, tp, fp = _ranked_curve(s, y)
    f1, t = _f1max_from_curve(thr, tp, fp)
    return {
        "i_auroc": _auroc_from_curve(tp, fp),
        "i_ap": _ap_from_curve(tp, fp),
        "i_f1max": f1,
        "f1max_threshold": t,
    }


def f1max_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold that maximises F1 (predict anomalous when ``score >= threshold``).

    Same definition and tie rule as ``image_metrics(...)["f1max_threshold"]``: one of the given
    scores, the highest among equally good ones. Raises ValueError as :func:`image_metrics`.
    """
    s, y = _check_scores_labels(scores, labels)
    thr, tp, fp = _ranked_curve(s, y)
    return _f1max_from_curve(thr, tp, fp)[1]


# --------------------------------------------------------------------------------------------------
# pixel level
# --------------------------------------------------------------------------------------------------


def _as_batch(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate maps/masks and return them as ``float64 [B,H,W]`` and ``bool [B,H,W]``."""
    m = np.asarray(maps)
    g = np.asarray(masks)
    if m.shape != g.shape:
        raise ValueError(f"maps and masks differ in shape: {m.shape} vs {g.shape}")
    if m.ndim == 2:
        m, g = m[None], g[None]
    elif m.ndim != 3:
        raise ValueError(f"maps must be [H,W] or [B,H,W]; got shape {m.shape}")
    m = m.astype(np.float64, copy=False)
    if np.isnan(m).any():
        raise ValueError(f"maps contain {int(np.isnan(m).sum())} NaN value(s)")
    if g.dtype != np.bool_:
        if not np.isin(g, (0, 1)).all():
            raise ValueError("masks must be bool (or 0/1); got other values")
        g = g.astype(bool)
    return m, g


def _inverse_region_sizes(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """For ``masks`` bool ``[B,H,W]``: 1/|region| for each positive pixel (row-major order) and R.

    Regions are 8-connected components of each image's mask; images never share a region.
    """
    weights = []
    n_regions = 0
    for g in masks:
        if not g.any():
            continue
        g8 = np.ascontiguousarray(g, dtype=np.uint8)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(g8, connectivity=8)
        n_regions += n - 1
        inv = np.zeros(n, dtype=np.float64)
        inv[1:] = 1.0 / stats[1:, cv2.CC_STAT_AREA]
        weights.append(inv[lab[g]])
    if not weights:
        return np.zeros(0, dtype=np.float64), 0
    return np.concatenate(weights), n_regions


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Normalised trapezoid area under PRO(FPR) over ``[0, fpr_limit]``.

    ``fpr`` and ``pro`` are the curve points from the highest threshold down (both non-decreasing),
    without the origin; the curve is taken to start at (0, 0). Points with ``fpr <= fpr_limit`` are
    used as they are; the curve is closed with the linear interpolation between the last such point
    and the first one beyond, evaluated at ``fpr == fpr_limit`` exactly. The area is divided by
    ``fpr_limit`` (computed as the sum of the trapezoid widths) so a perfect map scores 1.0.
    """
    x = np.concatenate(([0.0], fpr))
    y = np.concatenate(([0.0], pro))
    k = int(np.searchsorted(x, fpr_limit, side="right"))  # x[:k] <= fpr_limit < x[k:]
    if k < x.size:
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = np.append(x[:k], fpr_limit)
        y = np.append(y[:k], y_lim)
    widths = np.diff(x)
    area = float(np.sum(widths * (y[1:] + y[:-1]) * 0.5))
    # The widths sum to fpr_limit in exact arithmetic; dividing by their float sum instead makes the
    # result a width-weighted mean of trapezoid heights, so a perfect map gives exactly 1.0.
    return area / float(np.sum(widths))


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    return fpr_limit


class PixelMetrics:
    """Streaming pixel-level P-AUROC, P-AP and AUPRO in O(bins) memory.

    Every pixel is binned into ``bins`` equal-width bins over ``[lo, hi]``; values outside clip into
    the end bins (``-inf`` into the first, ``+inf`` into the last). Three histograms are kept over
    the same bins: normal-pixel counts, defect-pixel counts, and defect pixels weighted by
    ``1/|region|``, plus the total number of ground-truth regions ``R`` (8-connected components of
    each image's mask). Memory is ``3 * bins * 8`` bytes (24 MiB at the default 2**20 bins), fixed
    at construction.

    Thresholds are the bin edges: a pixel counts as predicted anomalous at threshold bin ``b`` when
    its bin is ``>= b``, so pixels in one bin always tie. All three metrics are therefore exact
    (equal to :func:`image_metrics` on the flattened pixels / :func:`aupro_exact`) whenever distinct
    values fall into distinct bins, and otherwise differ only by merging values closer than a bin.

    * ``p_auroc``: pairs (defect, normal) in the same bin count 1/2.
    * ``p_ap``: step-sum ``sum (R_b - R_{b+1}) * P_b`` over bins from high to low.
    * ``aupro``: PRO(b) = (1/R) * sum over defect pixels in bins >= b of 1/|region(pixel)|, which is
      the mean over regions of the fraction of the region's pixels predicted anomalous;
      FPR(b) = normal pixels in bins >= b / all normal pixels. The curve starts at (0, 0), is
      integrated with the trapezoid rule over ``[0, fpr_limit]`` with linear interpolation at
      ``fpr_limit`` exactly, and divided by ``fpr_limit`` (a perfect map gives 1.0).

    Example::

        pm = PixelMetrics(lo=0.0, hi=2.0)
        for maps, masks in batches:  # maps float [B,H,W], masks bool [B,H,W]
            pm.update(maps, masks)
        pm.compute()  # {"p_auroc": ..., "p_ap": ..., "aupro": ...}
    """

    def __init__(self, lo: float = 0.0, hi: float = 2.0, bins: int = 1 << 20, fpr_limit: float = 0.3) -> None:
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"need finite lo < hi; got lo={lo}, hi={hi}")
        if int(bins) != bins or bins < 1:
            raise ValueError(f"bins must be a positive integer; got {bins}")
        self.lo = float(lo)
        self.hi = float(hi)
        self.bins = int(bins)
        self.fpr_limit = _check_fpr_limit(fpr_limit)
        self._scale = self.bins / (self.hi - self.lo)
        self.neg = np.zeros(self.bins, dtype=np.int64)
        self.pos = np.zeros(self.bins, dtype=np.int64)
        self.pos_w = np.zeros(self.bins, dtype=np.float64)
        self.n_regions = 0

    def reset(self) -> None:
        """Forget everything accumulated so far (the arrays are reused, not reallocated)."""
        self.neg.fill(0)
        self.pos.fill(0)
        self.pos_w.fill(0.0)
        self.n_regions = 0

    def _bin(self, values: np.ndarray) -> np.ndarray:
        v = np.clip(values, self.lo, self.hi)
        idx = ((v - self.lo) * self._scale).astype(np.int64)
        np.minimum(idx, self.bins - 1, out=idx)  # v == hi lands in the last bin, not one past it
        return idx

    def _add(self, hist: np.ndarray, idx: np.ndarray, weights: np.ndarray | None = None) -> None:
        if idx.size == 0:
            return
        if idx.size * 8 < self.bins:
            # A small update: a full-length bincount would allocate and add `bins` entries for a few
            # thousand pixels, so fold duplicates first and scatter only the touched bins.
            u, inv = np.unique(idx, return_inverse=True)
            hist[u] += np.bincount(inv, weights=weights, minlength=u.size).astype(hist.dtype, copy=False)
        else:
            hist += np.bincount(idx, weights=weights, minlength=self.bins).astype(hist.dtype, copy=False)

    def update(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """Add a batch: ``maps`` float ``[B,H,W]`` or ``[H,W]``, ``masks`` bool of the same shape.

        Each image's mask is split into its own 8-connected regions. Raises ValueError on a shape
        mismatch, NaN in ``maps`` or non-binary ``masks``.
        """
        m, g = _as_batch(maps, masks)
        inv_size, n_regions = _inverse_region_sizes(g)
        idx = self._bin(m)
        self._add(self.neg, idx[~g])
        pos_idx = idx[g]  # row-major, the same order as inv_size
        self._add(self.pos, pos_idx)
        self._add(self.pos_w, pos_idx, inv_size)
        self.n_regions += n_regions

    def compute(self) -> dict[str, float]:
        """Return ``{"p_auroc", "p_ap", "aupro"}`` for everything accumulated so far.

        Raises ValueError when no defect pixel or no normal pixel has been seen.
        """
        n_neg = int(self.neg.sum())
        n_pos = int(self.pos.sum())
        if n_pos == 0 or n_neg == 0:
            msg = f"pixel metrics need both defect and normal pixels; got {n_pos} defect, {n_neg} normal"
            raise ValueError(msg)
        # Sweep from the highest bin down; float64 is exact for counts below 2**53.
        tp = np.cumsum(self.pos[::-1], dtype=np.float64)
        fp = np.cumsum(self.neg[::-1], dtype=np.float64)
        # sum(pos_w) equals R up to rounding; dividing by the float total makes PRO end at exactly
        # 1.0, so a perfect map scores exactly 1.0 rather than 1 - 1 ulp.
        pro_w = np.cumsum(self.pos_w[::-1])
        pro = pro_w / pro_w[-1]
        # Empty bins repeat the previous point: harmless for AUROC/AUPRO (zero-width or zero-height
        # steps) and for AP (zero recall step), so no compaction is needed.
        p_auroc = _auroc_from_curve(tp, fp)
        nonempty = (tp + fp) > 0  # precision is undefined above the highest occupied bin
        p_ap = _ap_from_curve(tp[nonempty], fp[nonempty])
        aupro = _area_to_limit(fp / n_neg, pro, self.fpr_limit)
        return {"p_auroc": p_auroc, "p_ap": p_ap, "aupro": aupro}


def aupro_exact(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Non-streaming AUPRO reference: thresholds at every distinct value of ``maps``.

    Same definition as :class:`PixelMetrics` (8-connected regions per image, predict anomalous when
    ``value >= threshold``, curve from (0, 0), trapezoid to ``fpr_limit`` with linear interpolation
    there, divided by ``fpr_limit``) but sort based with no binning, so it holds every pixel in
    memory. Meant for tests and small sets.

    Args:
        maps: float ``[B,H,W]`` or ``[H,W]``.
        masks: bool of the same shape; must contain defect and normal pixels.
        fpr_limit: upper end of the FPR integration range, in (0, 1].
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    m, g = _as_batch(maps, masks)
    inv_size, n_regions = _inverse_region_sizes(g)
    n_pos = int(g.sum())
    n_neg = g.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUPRO needs both defect and normal pixels; got {n_pos} defect, {n_neg} normal")
    values = np.concatenate((m[g], m[~g]))
    weights = np.concatenate((inv_size, np.zeros(n_neg)))
    is_neg = np.concatenate((np.zeros(n_pos), np.ones(n_neg)))
    order = np.argsort(-values, kind="stable")
    v = values[order]
    ends = np.append(np.flatnonzero(v[1:] != v[:-1]), v.size - 1)
    fpr = np.cumsum(is_neg[order])[ends] / n_neg
    pro_w = np.cumsum(weights[order])[ends]
    pro = pro_w / pro_w[-1]  # the total is R up to rounding (see PixelMetrics.compute)
    return _area_to_limit(fpr, pro, fpr_limit)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def top_fraction_mean(maps: np.ndarray, fraction: float = 0.01) -> float | np.ndarray:
    """Mean of the top ``k = max(1, floor(n * fraction))`` values of each map (the image score).

    Args:
        maps: one map ``[H,W]`` or a batch ``[B,H,W]``; ``n = H*W``.
        fraction: in (0, 1]. 0.01 at 256x256 gives k = 655, as in the method spec.

    Returns:
        A float for one map, a float64 array ``[B]`` for a batch.

    Uses ``np.partition`` (linear time), not a full sort. ``floor`` is taken after adding 1e-9 so
    that fractions such as 0.29 of 100 pixels give 29 rather than 28 from float rounding.
    """
    a = np.asarray(maps)
    if a.ndim not in (2, 3):
        raise ValueError(f"maps must be [H,W] or [B,H,W]; got shape {a.shape}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    flat = a.reshape(a.shape[0], -1) if a.ndim == 3 else a.reshape(1, -1)
    n = flat.shape[1]
    if n == 0:
        raise ValueError("maps are empty")
    k = max(1, math.floor(n * fraction + 1e-9))
    top = np.partition(flat, n - k, axis=1)[:, n - k :]
    out = top.mean(axis=1, dtype=np.float64)
    return float(out[0]) if a.ndim == 2 else out
