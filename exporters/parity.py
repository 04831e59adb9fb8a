"""The parity gate: an exported model must reproduce its reference on real images.

Exported scores drifting from the trained model is the most reported failure of anomaly-detection
exports (line-side.md point 1). Every export is therefore compared, on real images (the run's
test images by default), with the model it came from, and refused outside these tolerances:

================  ===============  =================  ==============
reference -> file  map max |diff|  score max |diff|   Spearman (score)
================  ===============  =================  ==============
fp32              <= 1e-4          <= 1e-4            >= 0.999
fp16              <= 1e-2          <= 5e-3            >= 0.99
================  ===============  =================  ==============

Why these numbers. fp32 ONNX Runtime vs PyTorch differ by operator order only: measured ~4e-7 on
the tiny test model and ~1e-6 on ViT-S/14; 1e-4 leaves two orders of margin for other CPUs and
thread counts while still catching any real graph difference (a wrong resize mode moves the map by
1e-2 or more). The map is on the 1 - cos scale (trained ViT-S scores are ~0.01-0.3), so 1e-4 is
well below anything that changes a decision. fp16 rounds every feature to 11 bits; the scorer
stays float32 (onnx_export), and the measured error is ~2e-4; the fp16 bounds allow
TensorRT's own kernels some room while still being an order of magnitude below typical gaps
between normal and defect scores. Spearman's rho on the image scores checks that the ranking (what
decides OK/NG at any threshold) survives; fp16 may swap two near-tied images among a handful,
hence 0.99.

The gate also compares ONNX Runtime with another backend (a TensorRT engine) with the same rules:
:func:`check_backend_parity`.

Reduced-precision variants served on a CPU (ONNX Runtime fp16, OpenVINO bf16 and INT8) must also
pass the *decision gate* (:func:`check_decisions`), against ONNX Runtime fp32 on a larger set of
real images (test and kept training images stored in the bundle): Spearman's rho of the scores
>= 0.999 and OK/NG agreement at the bundle threshold >= 99.5%, besides the map and score bounds
of the variant's precision. Those are what the line sees: a variant that ranks parts differently
or flips decisions is refused however fast it is. On n images, 99.5% allows floor(0.005 n)
flipped decisions: none below 200 images. bf16 keeps 8 bits of mantissa and INT8 quantises
weights and activations, so their map bounds are wider than fp16's; the decision figures carry
the weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llb_edge.bundle import INPUT_NAME, MAP_OUTPUT, MAX_OUTPUT, SCORE_OUTPUT, Bundle, BundleError, sha256_file
from llb_edge.errors import LLBEdgeError

if TYPE_CHECKING:
    from torch import nn

Outputs = tuple[np.ndarray, np.ndarray, np.ndarray]  # map [B,1,M,M], score [B], max [B]
Runner = Callable[[np.ndarray], Outputs]

# Fewer images than this and a rank correlation says nothing.
MIN_PARITY_IMAGES = 4
DEFAULT_PARITY_IMAGES = 8

# Real images stored in a bundle (uint8 [N, crop, crop, 3] model inputs), so gates and builds run
# on a line PC that has the bundle but not the training data: bundle.json extra key -> file name.
PARITY_IMAGES = ("parity_images", "parity_images.npy")  # the parity gate (test images)
GATE_IMAGES = ("gate_images", "gate_images.npy")  # the decision gate (test and kept training images)
CALIBRATION_IMAGES = ("calibration_images", "calibration_images.npy")  # INT8 calibration (kept training)
PARITY_IMAGES_FILE = PARITY_IMAGES[1]


# The decision gate of reduced-precision CPU variants (module docstring).
DECISION_MIN_SPEARMAN = 0.999
DECISION_MIN_AGREEMENT = 0.995


@dataclass(frozen=True)
class ParityTolerance:
    map_max_abs: float
    score_max_abs: float
    min_spearman: float
    # OK/NG agreement with the reference at the bundle threshold; None: decisions not compared.
    min_agreement: float | None = None


TOLERANCES: dict[str, ParityTolerance] = {
    "fp32": ParityTolerance(map_max_abs=1e-4, score_max_abs=1e-4, min_spearman=0.999),
    "fp16": ParityTolerance(map_max_abs=1e-2, score_max_abs=5e-3, min_spearman=0.99),
    "bf16": ParityTolerance(map_max_abs=5e-2, score_max_abs=2e-2, min_spearman=DECISION_MIN_SPEARMAN),
    "int8": ParityTolerance(map_max_abs=5e-2, score_max_abs=2e-2, min_spearman=DECISION_MIN_SPEARMAN),
}


def tolerance_for(precision: str) -> ParityTolerance:
    if precision not in TOLERANCES:
        raise ValueError(f"no parity tolerance for precision {precision!r}; known: {', '.join(TOLERANCES)}")
    return TOLERANCES[precision]


@dataclass
class ParityReport:
    reference: str  # e.g. "pytorch-fp32", "onnxruntime-fp32"
    candidate: str  # e.g. "onnxruntime-fp16", "tensorrt-fp16"
    images: int
    map_max_abs: float
    score_max_abs: float
    score_max_max_abs: float  # the score_max output
    spearman: float
    tolerance: ParityTolerance
    passed: bool
    failures: list[str] = field(default_factory=list)
    # Decision figures, when the tolerance compares decisions: the threshold, the fraction of
    # images with the same OK/NG answer, how many differ and how many the reference calls NG.
    threshold: float | None = None
    agreement: float | None = None
    disagreements: int | None = None
    reference_ng: int | None = None

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        for key in ("map_max_abs", "score_max_abs", "score_max_max_abs", "spearman", "agreement"):
            if values[key] is not None:
                values[key] = float(f"{values[key]:.4g}")
        return values

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        decisions = ""
        if self.agreement is not None:
            decisions = (f", OK/NG agreement {self.agreement:.2%} ({self.disagreements} of {self.images} differ, "
                         f"threshold {self.threshold:.6g})")
        return (f"{verdict} {self.candidate} vs {self.reference} on {self.images} images: map max |diff| "
                f"{self.map_max_abs:.3g}, score max |diff| {self.score_max_abs:.3g}, Spearman {self.spearman:.5f}"
                f"{decisions}")


class ParityError(LLBEdgeError, RuntimeError):
    """The candidate does not reproduce the reference within tolerance; ``report`` says by how much."""

    def __init__(self, report: ParityReport) -> None:
        self.report = report
        super().__init__(f"parity gate failed: {report.summary()} ({'; '.join(report.failures)})")


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks (as Spearman's rho needs)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start index of each run of equal values in the sorted order.
    starts = np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))
    ends = np.concatenate((starts[1:], [len(values)]))
    mean_ranks = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_ranks, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's r of the (tie-averaged) ranks.

    Both constant: 1.0 (the rankings agree trivially). One constant: 0.0 (no ranking to agree with).
    """
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if len(a) != len(b):
        raise ValueError(f"spearman needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError("spearman needs at least 2 values")
    ra, rb = rankdata(a), rankdata(b)
    da, db = ra - ra.mean(), rb - rb.mean()
    norm = math.sqrt(float(da @ da) * float(db @ db))
    if norm == 0.0:
        return 1.0 if float(da @ da) == float(db @ db) == 0.0 else 0.0
    return float(da @ db) / norm


def compare_outputs(
    reference: Outputs, candidate: Outputs, tolerance: ParityTolerance, reference_name: str, candidate_name: str,
    threshold: float | None = None,
) -> ParityReport:
    """Measure the differences and apply ``tolerance``. Non-finite candidate outputs always fail.

    A tolerance with ``min_agreement`` also compares OK/NG decisions (``score >= threshold`` is NG,
    as on the line) and needs ``threshold``.
    """
    if tolerance.min_agreement is not None and threshold is None:
        raise ValueError("comparing decisions needs the bundle threshold")
    ref_map, ref_score, ref_max = (np.asarray(x, dtype=np.float64) for x in reference)
    cand_map, cand_score, cand_max = (np.asarray(x, dtype=np.float64) for x in candidate)
    if ref_map.shape != cand_map.shape or ref_score.shape != cand_score.shape:
        raise ValueError(f"output shapes differ: map {ref_map.shape} vs {cand_map.shape}, "
                         f"score {ref_score.shape} vs {cand_score.shape}")
    failures: list[str] = []
    finite = all(np.isfinite(x).all() for x in (cand_map, cand_score, cand_max))
    if not finite:
        failures.append("candidate outputs contain NaN or inf")
    map_diff = float(np.max(np.abs(ref_map - cand_map))) if finite else math.inf
    score_diff = float(np.max(np.abs(ref_score - cand_score))) if finite else math.inf
    max_diff = float(np.max(np.abs(ref_max - cand_max))) if finite else math.inf
    rho = spearman(ref_score, cand_score) if finite else 0.0
    if map_diff > tolerance.map_max_abs:
        failures.append(f"map max |diff| {map_diff:.3g} > {tolerance.map_max_abs:g}")
    if score_diff > tolerance.score_max_abs:
        failures.append(f"score max |diff| {score_diff:.3g} > {tolerance.score_max_abs:g}")
    if max_diff > tolerance.map_max_abs:  # score_max is a map value: the map bound applies
        failures.append(f"score_max max |diff| {max_diff:.3g} > {tolerance.map_max_abs:g}")
    if rho < tolerance.min_spearman:
        failures.append(f"Spearman {rho:.5f} < {tolerance.min_spearman:g}")
    decisions: dict[str, Any] = {}
    if tolerance.min_agreement is not None and threshold is not None:
        reference_ng = ref_score >= threshold
        # A non-finite score decides nothing: count it as a flipped decision.
        flipped = ((cand_score >= threshold) != reference_ng) | ~np.isfinite(cand_score)
        differ = int(np.count_nonzero(flipped))
        agreement = 1.0 - differ / len(ref_score)
        decisions = {"threshold": float(threshold), "agreement": agreement, "disagreements": differ,
                     "reference_ng": int(np.count_nonzero(reference_ng))}
        if agreement < tolerance.min_agreement:
            failures.append(f"OK/NG agreement {agreement:.2%} < {tolerance.min_agreement:.1%} "
                            f"({differ} of {len(ref_score)} images decided differently)")
    return ParityReport(
        reference=reference_name, candidate=candidate_name, images=int(len(ref_score)), map_max_abs=map_diff,
        score_max_abs=score_diff, score_max_max_abs=max_diff, spearman=rho, tolerance=tolerance,
        passed=not failures, failures=failures, **decisions,
    )


def _batched(run: Runner, images: np.ndarray, batch_size: int) -> Outputs:
    parts = [run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    maps = np.concatenate([np.asarray(p[0], dtype=np.float32) for p in parts])
    scores = np.concatenate([np.asarray(p[1], dtype=np.float32).reshape(-1) for p in parts])
    maxes = np.concatenate([np.asarray(p[2], dtype=np.float32).reshape(-1) for p in parts])
    return maps, scores, maxes


def run_torch(model: nn.Module, images: np.ndarray, batch_size: int = 8) -> Outputs:
    """The PyTorch reference: ``model`` (InspectionModel) on uint8 [N, H, W, 3] images, on CPU."""
    import torch

    model = model.eval()
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(batch: np.ndarray) -> Outputs:
        outputs = model(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
        return tuple(o.float().cpu().numpy() for o in outputs)

    return _batched(run, images, batch_size)


def onnxruntime_runner(onnx_path: str | Path, threads: int | None = None) -> Runner:
    """A CPU ONNX Runtime session on ``onnx_path`` as a runner (all optimisations on, as on the line)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> Outputs:
        maps, scores, maxes = session.run([MAP_OUTPUT, SCORE_OUTPUT, MAX_OUTPUT],
                                          {INPUT_NAME: np.ascontiguousarray(batch)})
        return maps, scores, maxes

    return run


def run_onnxruntime(onnx_path: str | Path, images: np.ndarray, batch_size: int = 8,
                    threads: int | None = None) -> Outputs:
    return _batched(onnxruntime_runner(onnx_path, threads), images, batch_size)


def _check_images(images: np.ndarray) -> np.ndarray:
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"parity images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if len(images) < MIN_PARITY_IMAGES:
        raise ValueError(f"parity needs at least {MIN_PARITY_IMAGES} real images, got {len(images)}")
    return images


def check_onnx_parity(
    model: nn.Module,
    onnx_path: str | Path,
    images: np.ndarray,
    precision: str,
    reference: Outputs | None = None,
    batch_size: int = 8,
) -> ParityReport:
    """ONNX Runtime (``onnx_path``) vs the fp32 PyTorch model on ``images``; does not raise.

    The reference is always the fp32 PyTorch model, also for the fp16 file: the question is
    whether the deployed file reproduces the *trained* model. Pass ``reference`` (outputs of
    :func:`run_torch`) to reuse it across precisions.
    """
    images = _check_images(images)
    if reference is None:
        reference = run_torch(model, images, batch_size)
    candidate = run_onnxruntime(onnx_path, images, batch_size)
    return compare_outputs(reference, candidate, tolerance_for(precision), "pytorch-fp32",
                           f"onnxruntime-{precision}")


def check_backend_parity(
    onnx_path: str | Path,
    images: np.ndarray,
    run_candidate: Runner,
    precision: str,
    candidate_name: str = "tensorrt",
    reference: Outputs | None = None,
    batch_size: int = 8,
    threshold: float | None = None,
) -> ParityReport:
    """Another backend (``run_candidate``, e.g. a TensorRT engine) vs ONNX Runtime on ``onnx_path``.

    ``onnx_path`` should be the fp32 graph: the engine is then held to the same bar as the fp16
    ONNX file against the trained model. ``precision`` picks the tolerance (the engine's). With
    ``threshold`` (the bundle's) the candidate faces the decision gate (:func:`check_decisions`).
    """
    images = _check_images(images)
    if reference is None:
        reference = run_onnxruntime(onnx_path, images, batch_size)
    candidate = _batched(run_candidate, images, batch_size)
    if threshold is not None:
        return check_decisions(reference, candidate, threshold, precision, f"{candidate_name}-{precision}")
    return compare_outputs(reference, candidate, tolerance_for(precision), "onnxruntime-fp32",
                           f"{candidate_name}-{precision}")


def decision_tolerance(precision: str) -> ParityTolerance:
    """The decision gate for a reduced-precision variant: its precision's bounds, plus rank and OK/NG rules."""
    base = tolerance_for(precision)
    return ParityTolerance(map_max_abs=base.map_max_abs, score_max_abs=base.score_max_abs,
                           min_spearman=max(base.min_spearman, DECISION_MIN_SPEARMAN),
                           min_agreement=DECISION_MIN_AGREEMENT)


def check_decisions(
    reference: Outputs, candidate: Outputs, threshold: float, precision: str, candidate_name: str,
    reference_name: str = "onnxruntime-fp32",
) -> ParityReport:
    """The decision gate (module docstring): ``candidate`` vs the fp32 ``reference`` outputs; does not raise.

    Both are outputs on the same real images (at least MIN_PARITY_IMAGES of them).
    """
    if len(np.asarray(reference[1]).reshape(-1)) < MIN_PARITY_IMAGES:
        raise ValueError(f"the decision gate needs at least {MIN_PARITY_IMAGES} real images")
    return compare_outputs(reference, candidate, decision_tolerance(precision), reference_name, candidate_name,
                           threshold=threshold)


def require(report: ParityReport) -> ParityReport:
    """Raise :class:`ParityError` unless ``report`` passed."""
    if not report.passed:
        raise ParityError(report)
    return report


def bundle_images(bundle: Bundle, image_set: tuple[str, str] = PARITY_IMAGES) -> np.ndarray:
    """One of the image sets stored in a bundle (``PARITY_IMAGES``, ...), checksum-verified."""
    key, default_file = image_set
    info = bundle.manifest.extra.get(key) or {}
    path = bundle.root / str(info.get("path", default_file))
    if not path.is_file():
        raise BundleError(f"bundle {bundle.root} has no {key.replace('_', ' ')} ({path.name}); re-export it")
    if info.get("sha256") and sha256_file(path) != info["sha256"]:
        raise BundleError(f"{path} fails its checksum; the bundle is corrupt, re-export it")
    return np.load(path, allow_pickle=False)


def bundle_parity_images(bundle: Bundle) -> np.ndarray:
    """The parity images stored in a bundle, checksum-verified."""
    return bundle_images(bundle, PARITY_IMAGES)


def spread_indices(labels: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` indices, half anomalous and half normal where possible, evenly spaced.

    Parity on images that all score alike would make the rank test meaningless; mixing defect and
    normal images spreads the scores. Deterministic, so bundle.json lists the same images each time.
    """
    labels = list(labels)
    anomalous = [i for i, label in enumerate(labels) if label == 1]
    others = [i for i, label in enumerate(labels) if label != 1]
    want_anomalous = min(len(anomalous), count // 2)
    want_others = min(len(others), count - want_anomalous)
    want_anomalous = min(len(anomalous), count - want_others)

    def pick(pool: list[int], n: int) -> list[int]:
        if n <= 0:
            return []
        return [pool[int(j)] for j in np.unique(np.linspace(0, len(pool) - 1, n).round().astype(int))]

    return sorted(pick(anomalous, want_anomalous) + pick(others, want_others))
