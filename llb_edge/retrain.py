"""`llb-edge retrain`: pool -> LLB training -> candidate bundle -> comparison -> gate -> promotion.

One cycle, in ``<out_root>/<name>/``::

    data/pool/*.png        hard links to the pool's unlabelled frames (a snapshot: capture may evict
                           pool files while training runs); data/labeled/*.png the labelled ones
    data/snapshot.json     the snapshot's frames with their capture metadata (written last: complete)
    run/                   the training run (llb-edge train's run directory)
    candidate/             the exported candidate bundle (parity-gated by export_bundle)
    report/                comparison.json, decision.json, report.html, scores.png, agreement.png

The training set is a generated "folder" dataset over data/pool, and the held-back slice is that
reader's seeded test split (``data.test_fraction = holdout_fraction``, ``data.split_seed = seed``),
read back from the run's record of its split (split.json). Labelled frames are never trained on:
they are evaluated with both models, besides the held-back slice.

Both bundles are scored with ONNX Runtime exactly as the daemon scores frames (same decode, same
geometry, same graph), so the comparison predicts what the line will see. Pool frames carry their
capture probability ``p``; NG rates and disagreement weigh each frame 1/p, which undoes the extra
sampling of NG and near-threshold frames (otherwise a pool rich in NG frames would exaggerate
every NG-rate difference).

The cycle composes every step (trainer, exporters, and the runtime's backends and versions folder),
so it sits beside the CLI as part of the top layer: trainer/ and runtime/ do not import each other.

An interrupted cycle resumes (``resume_dir``) at the step where it stopped: the snapshot, the
training run (itself resumable), the export and the comparison are each reused once complete, and
the gate always decides afresh, so resuming a finished cycle re-judges it under the gate given now.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llb_edge import metrics
from llb_edge.bundle import ONNX_PRECISIONS, Bundle, load_bundle, operator_name, utc_now
from llb_edge.config import RunConfig, apply_overrides, load_config, validate
from llb_edge.errors import LLBEdgeError
from llb_edge.pool import PoolFrame, read_pool
from llb_edge.runs import CONFIG, METADATA, read_json, read_metadata, read_run_config, read_split, write_json
from llb_edge.runtime.versions import VersionChange, list_versions, promote, resolve_bundle_dir
from llb_edge.trainer.label import read_labels

log = logging.getLogger(__name__)

DATA_DIR, POOL_SUBDIR, LABELED_SUBDIR = "data", "pool", "labeled"
SNAPSHOT_FILE = "snapshot.json"
RUN_NAME, CANDIDATE_DIR, REPORT_DIR = "run", "candidate", "report"
COMPARISON_FILE, DECISION_FILE = "comparison.json", "decision.json"
MIN_TRAIN_FRAMES = 2


class RetrainError(LLBEdgeError, RuntimeError):
    """A retrain that cannot start or finish (pool too small, no comparison to judge...)."""


@dataclass
class GateConfig:
    """When a candidate may replace the current model (checked on the held-back slice).

    Defaults are deliberately strict: a retrain that changes many decisions is worth a human look
    at its report (and a manual `llb-edge promote`), not an automatic swap.
    """

    max_ng_rate_change: float = 0.02  # |NG rate candidate - NG rate current|, each at its own threshold
    max_disagreement: float = 0.05  # fraction of frames whose OK/NG decision differs
    max_labeled_drop: float = 0.02  # labelled frames: no metric may drop more than this (when labels exist)
    min_holdout: int = 30  # fewer held-back frames than this say too little to promote on

    def validate(self) -> None:
        for name in ("max_ng_rate_change", "max_disagreement", "max_labeled_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise RetrainError(f"gate {name} must be in [0, 1], got {getattr(self, name)}")
        if self.min_holdout < 0:
            raise RetrainError(f"gate min_holdout must be >= 0, got {self.min_holdout}")


@dataclass(frozen=True)
class GateCheck:
    name: str
    value: float | None
    limit: float | None
    passed: bool
    detail: str


@dataclass
class RetrainDecision:
    passed: bool
    promoted: bool
    candidate_version: str
    current_version: str
    checks: list[GateCheck]
    work_dir: Path
    candidate_dir: Path
    report_dir: Path
    promotion: VersionChange | None = None
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def reasons(self) -> list[str]:
        """One line per check, failures first."""
        ordered = sorted(self.checks, key=lambda c: c.passed)
        return [f"{'pass' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in ordered]

    @property
    def decision_path(self) -> Path:
        return self.report_dir / DECISION_FILE

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "promoted": self.promoted, "candidate_version": self.candidate_version,
            "current_version": self.current_version, "reasons": self.reasons,
            "checks": [asdict(c) for c in self.checks], "work_dir": str(self.work_dir),
            "candidate_dir": str(self.candidate_dir), "report_dir": str(self.report_dir),
            "promotion": self.promotion.to_dict() if self.promotion else None, "timing": self.timing,
        }


# ------------------------------------------------------------------------------------- the gate


def evaluate_gate(comparison: dict[str, Any], gate: GateConfig) -> list[GateCheck]:
    """The gate's checks on a comparison (comparison.json); pure, so a report can be re-judged."""
    gate.validate()
    checks = []
    n = int(comparison["holdout"]["frames"])
    checks.append(GateCheck("min_holdout", float(n), float(gate.min_holdout), n >= gate.min_holdout,
                            f"{n} held-back frames (need {gate.min_holdout})"))
    change = comparison.get("ng_rate_change")
    if change is None:
        checks.append(GateCheck("ng_rate_change", None, gate.max_ng_rate_change, False, "no held-back frames"))
    else:
        cur, cand = comparison["current"]["ng_rate"], comparison["candidate"]["ng_rate"]
        checks.append(GateCheck("ng_rate_change", abs(change), gate.max_ng_rate_change,
                                abs(change) <= gate.max_ng_rate_change,
                                f"NG rate {cur:.2%} -> {cand:.2%} (|change| {abs(change):.2%}, "
                                f"max {gate.max_ng_rate_change:.2%})"))
    disagreement = comparison.get("disagreement")
    checks.append(GateCheck(
        "disagreement", disagreement, gate.max_disagreement,
        disagreement is not None and disagreement <= gate.max_disagreement,
        "no held-back frames" if disagreement is None
        else f"decisions differ on {disagreement:.2%} (max {gate.max_disagreement:.2%})"))
    current, candidate = comparison["current"].get("labeled", {}), comparison["candidate"].get("labeled", {})
    shared = [key for key in ("i_auroc", "accuracy", "ng_recall", "ok_pass") if key in current and key in candidate]
    if not shared:
        checks.append(GateCheck("labeled", None, None, True, "no labelled frames: check skipped"))
    for key in shared:
        drop = current[key] - candidate[key]
        checks.append(GateCheck(f"labeled_{key}", drop, gate.max_labeled_drop, drop <= gate.max_labeled_drop,
                                f"{key} on labelled frames {current[key]:.3f} -> {candidate[key]:.3f} "
                                f"(max drop {gate.max_labeled_drop:.3f})"))
    return checks


# ------------------------------------------------------------------------------------- scoring


def score_bundle(bundle: Bundle, paths: Sequence[Path], backend: str, threads: int | None,
                 batch_size: int = 8) -> np.ndarray:
    """Image scores of ``bundle`` on image files, computed the way the daemon computes them."""
    from llb_edge.data.images import read_image_rgb
    from llb_edge.data.transforms import Geometry
    from llb_edge.runtime.backends import create_backend

    pre = bundle.manifest.preprocessing
    geometry = Geometry(pre.resize, pre.crop)
    runner = create_backend(bundle, backend, max_batch=batch_size, intra_op_threads=threads)
    try:
        scores = []
        for start in range(0, len(paths), batch_size):
            batch = np.stack([geometry.to_model_input(read_image_rgb(p)) for p in paths[start : start + batch_size]])
            scores.append(runner.run(batch)[1].reshape(-1))
    finally:
        runner.close()
    return np.concatenate(scores).astype(np.float64) if scores else np.zeros(0)


def _quantiles(scores: np.ndarray) -> dict[str, float]:
    if len(scores) == 0:
        return {}
    return {"mean": float(scores.mean()),
            **{f"q{q:g}": float(np.quantile(scores, q / 100)) for q in (0, 50, 90, 99, 100)}}


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def labeled_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Decision metrics at the model's own threshold, and I-AUROC when both classes are labelled."""
    if len(scores) == 0:
        return {}
    ng = scores >= threshold
    out = {"accuracy": float(np.mean(ng == (labels == 1)))}
    if np.any(labels == 1):
        out["ng_recall"] = float(np.mean(ng[labels == 1]))
    if np.any(labels == 0):
        out["ok_pass"] = float(np.mean(~ng[labels == 0]))
    if np.any(labels == 1) and np.any(labels == 0):
        out["i_auroc"] = float(metrics.image_metrics(scores, labels)["i_auroc"])
    return out


def compare_bundles(
    current: Bundle, candidate: Bundle, holdout: Sequence[tuple[Path, PoolFrame]],
    labeled: Sequence[tuple[Path, PoolFrame, str]], backend: str, threads: int | None,
) -> dict[str, Any]:
    """Both models on the held-back slice and the labelled frames: the gate's evidence."""
    paths = [p for p, _ in holdout] + [p for p, _, _ in labeled]
    scores = {"current": score_bundle(current, paths, backend, threads),
              "candidate": score_bundle(candidate, paths, backend, threads)}
    n = len(holdout)
    weights = np.asarray([f.weight for _, f in holdout], dtype=np.float64)
    labels = np.asarray([1 if label == "NG" else 0 for _, _, label in labeled])
    sides: dict[str, dict[str, Any]] = {}
    decisions = {}
    for side, bundle in (("current", current), ("candidate", candidate)):
        threshold = bundle.threshold
        held = scores[side][:n]
        decisions[side] = held >= threshold
        sides[side] = {
            "model_version": bundle.manifest.model_version, "threshold": threshold, "bundle": str(bundle.root),
            "ng_rate": float(np.average(decisions[side], weights=weights)) if n else None,
            "score": _quantiles(held), "labeled": labeled_metrics(scores[side][n:], labels, threshold),
        }
    differ = decisions["current"] != decisions["candidate"]
    # Frames captured while the current model was serving: the score recomputed from the pool file
    # must equal the score the daemon published (a check of the whole capture path).
    replayed = [(i, f.score) for i, (_, f) in enumerate(holdout)
                if f.model_version == current.manifest.model_version and f.score is not None]
    replay_diff = max((abs(scores["current"][i] - s) for i, s in replayed), default=None)
    frames = [{"file": f.file, "set": "holdout", "label": None, "weight": float(f.weight),
               "current": float(scores["current"][i]), "candidate": float(scores["candidate"][i])}
              for i, (_, f) in enumerate(holdout)]
    frames += [{"file": f.file, "set": "labeled", "label": label, "weight": 1.0,
                "current": float(scores["current"][n + i]), "candidate": float(scores["candidate"][n + i])}
               for i, (_, f, label) in enumerate(labeled)]
    return {
        "holdout": {"frames": n, "weight": float(weights.sum())},
        "labeled_counts": {"OK": int(np.sum(labels == 0)), "NG": int(np.sum(labels == 1))},
        "current": sides["current"], "candidate": sides["candidate"],
        "ng_rate_change": (sides["candidate"]["ng_rate"] - sides["current"]["ng_rate"]) if n else None,
        "disagreement": float(np.average(differ, weights=weights)) if n else None,
        "ok_to_ng": float(np.average(~decisions["current"] & decisions["candidate"], weights=weights)) if n else None,
        "ng_to_ok": float(np.average(decisions["current"] & ~decisions["candidate"], weights=weights)) if n else None,
        "spearman": _spearman(scores["current"][:n], scores["candidate"][:n]),
        "replay_check": {"frames": len(replayed), "max_abs_diff": replay_diff},
        "backend": backend,
        "frames": frames,
    }


# ---------------------------------------------------------------------------------- preparation


def _link(src: Path, dst: Path) -> None:
    # A hard link costs nothing and survives the pool evicting the file; copy across file systems.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


Snapshot = tuple[dict[str, PoolFrame], list[tuple[Path, PoolFrame, str]]]  # ({file: frame}, [(path, frame, label)])


def snapshot_pool(pool_dir: Path, data_dir: Path) -> Snapshot:
    """Link the pool's frames into ``data_dir``, record them in snapshot.json; (unlabelled, labelled)."""
    shutil.rmtree(data_dir, ignore_errors=True)  # a snapshot interrupted earlier is taken again whole
    frames = read_pool(pool_dir)
    labels = read_labels(pool_dir)
    (data_dir / POOL_SUBDIR).mkdir(parents=True, exist_ok=True)
    (data_dir / LABELED_SUBDIR).mkdir(parents=True, exist_ok=True)
    unlabeled: dict[str, PoolFrame] = {}
    labeled = []
    for frame in frames:
        label = labels.get(frame.file)
        target = data_dir / (LABELED_SUBDIR if label else POOL_SUBDIR) / frame.file
        try:
            _link(frame.path, target)
        except FileNotFoundError:
            continue  # evicted between listing and linking
        if label:
            labeled.append((target, frame, label))
        else:
            unlabeled[frame.file] = frame
    write_json(data_dir / SNAPSHOT_FILE, {
        "unlabeled": [_frame_record(frame) for frame in unlabeled.values()],
        "labeled": [_frame_record(frame) | {"snapshot_path": str(path), "label": label}
                    for path, frame, label in labeled],
    })
    return unlabeled, labeled


def _frame_record(frame: PoolFrame) -> dict[str, Any]:
    return asdict(frame) | {"path": str(frame.path)}


def _frame_from_record(record: dict[str, Any]) -> PoolFrame:
    fields = {key: value for key, value in record.items() if key not in ("snapshot_path", "label")}
    return PoolFrame(**fields | {"path": Path(record["path"])})


def read_snapshot(data_dir: Path) -> Snapshot | None:
    """The snapshot a cycle already took, or None when it never completed."""
    if not (data_dir / SNAPSHOT_FILE).is_file():
        return None
    record = read_json(data_dir / SNAPSHOT_FILE)
    unlabeled = {frame.file: frame for frame in map(_frame_from_record, record["unlabeled"])}
    labeled = [(Path(r["snapshot_path"]), _frame_from_record(r), r["label"]) for r in record["labeled"]]
    return unlabeled, labeled


def retrain_config(
    current: Bundle, config: str | Path | None, overrides: Sequence[str], data_dir: Path, work_dir: Path,
    holdout_fraction: float, seed: int,
) -> RunConfig:
    """The training recipe: ``config`` if given, else the current model's own run config when it is on
    this machine (same encoder, weights, input size, LLB settings), else the defaults; then
    ``overrides``; then the data section pointed at the snapshot."""
    if config is not None:
        cfg = load_config(config, list(overrides))
    else:
        source = Path(current.manifest.source_run)
        base = read_run_config(source) if (source / CONFIG).is_file() else RunConfig()
        cfg = apply_overrides(base, overrides)
    cfg.name, cfg.out_dir = RUN_NAME, str(work_dir)
    d = cfg.data
    d.dataset, d.root, d.normal_dir, d.defect_dir, d.mask_dir = "folder", str(data_dir), POOL_SUBDIR, "", ""
    d.test_fraction, d.split_seed, d.contamination, d.max_test = holdout_fraction, seed, 0.0, 0
    validate(cfg)
    return cfg


def _new_name(taken: set[str]) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d.%H%M%S")
    name, n = stamp, 1
    while name in taken:
        name, n = f"{stamp}.{n}", n + 1
    return name


# ----------------------------------------------------------------------------------- the cycle


@dataclass(frozen=True)
class RetrainOptions:
    """What `llb-edge retrain` can be told besides its folders; the defaults are declared here only."""

    config: str | Path | None = None  # training recipe; None: the current model's run config (retrain_config)
    overrides: tuple[str, ...] = ()  # KEY=VALUE settings over the recipe
    gate: GateConfig = field(default_factory=GateConfig)
    holdout_fraction: float = 0.2  # share of the pool's unlabelled frames held back for the comparison
    seed: int = 0  # of the held-back slice
    versions_root: str | Path | None = None  # versioned bundle folder to promote into; None: never promote
    notify_endpoints: tuple[str, ...] = ()  # daemon control endpoints to hot-reload after a promotion
    promote_if_passed: bool = True  # False: decide and report only
    precisions: tuple[str, ...] = ONNX_PRECISIONS  # of the candidate bundle's ONNX graphs
    backend: str = "ort-cpu"  # comparison backend: ort-cpu | ort-cuda
    threads: int | None = None  # ONNX Runtime threads of the comparison; None: all cores
    by: str | None = None  # who promotes (the versions log); None: the operator's login name
    resume_dir: str | Path | None = None  # a cycle's work folder to continue (its recipe is the saved one)


def retrain(
    pool_dir: str | Path | None,
    current_bundle_dir: str | Path,
    out_root: str | Path,
    options: RetrainOptions | None = None,
) -> RetrainDecision:
    """One retrain cycle (module docstring). Promotes into ``options.versions_root`` (and notifies the
    daemons) only when the gate passes; otherwise the candidate and its report stay in the work folder,
    where `llb-edge promote` can still install it by hand. ``current_bundle_dir`` may be a versions
    root. ``pool_dir`` may be None when resuming a cycle whose pool snapshot is complete."""
    from llb_edge.exporters.bundle_export import export_bundle
    from llb_edge.exporters.export_options import ExportOptions
    from llb_edge.trainer.pipeline import run_training

    options = options or RetrainOptions()
    gate, versions_root = options.gate, options.versions_root
    gate.validate()
    if not 0.0 < options.holdout_fraction < 1.0:
        raise RetrainError(f"holdout_fraction must be in (0, 1), got {options.holdout_fraction}")
    timing: dict[str, float] = {}
    started = time.perf_counter()
    current = load_bundle(resolve_bundle_dir(current_bundle_dir), verify=True)
    if options.resume_dir is None:
        taken = {current.manifest.model_version, *(list_versions(versions_root) if versions_root else [])}
        version = _new_name(taken | {p.name.removeprefix("retrain-") for p in Path(out_root).glob("retrain-*")})
        work = Path(out_root) / f"retrain-{version}"
        work.mkdir(parents=True)
    else:
        work = Path(options.resume_dir)
        if not work.is_dir():
            raise RetrainError(f"cannot resume {work}: no such retrain work folder")
        version = work.name.removeprefix("retrain-")
        log.info("resuming retrain %s", work)
    report_dir = work / REPORT_DIR
    report_dir.mkdir(exist_ok=True)

    snapshot = read_snapshot(work / DATA_DIR)
    if snapshot is None:
        if pool_dir is None:
            raise RetrainError(f"{work} has no complete pool snapshot: give the pool to take it from")
        snapshot = snapshot_pool(Path(pool_dir), work / DATA_DIR)
    unlabeled, labeled = snapshot
    if len(unlabeled) < MIN_TRAIN_FRAMES + 1:
        raise RetrainError(f"pool {pool_dir} has {len(unlabeled)} unlabelled frames; capture more before retraining")
    saved_run = work / RUN_NAME
    if (saved_run / CONFIG).is_file():
        cfg = read_run_config(saved_run)  # a resumed cycle keeps its recipe and its held-back slice
    else:
        cfg = retrain_config(current, options.config, options.overrides, work / DATA_DIR, work,
                             options.holdout_fraction, options.seed)
    timing["snapshot_s"] = time.perf_counter() - started

    run_dir = saved_run
    if not (run_dir / METADATA).is_file():  # written last by a finished training run
        t0 = time.perf_counter()
        run_dir = run_training(cfg, resume=(saved_run / CONFIG).is_file(), evaluate_after=False)
        timing["train_s"] = time.perf_counter() - t0
    meta = read_metadata(run_dir)
    timing["encode_s"] = meta.timing.encode_seconds
    split = read_split(run_dir)  # the run's own seeded split: its test side is the held-back slice
    if len(split.test) < gate.min_holdout:
        log.warning("held-back slice has %d frames, the gate needs %d: the candidate will not be promoted "
                    "automatically", len(split.test), gate.min_holdout)

    candidate_dir = work / CANDIDATE_DIR
    if candidate_dir.is_dir():  # export_bundle renames its staging folder into place only when complete
        candidate = load_bundle(candidate_dir, verify=True)
    else:
        t0 = time.perf_counter()
        candidate = export_bundle(run_dir, candidate_dir, ExportOptions(
            precisions=options.precisions, model_id=current.manifest.model_id, model_version=version))
        timing["export_s"] = time.perf_counter() - t0

    if not (report_dir / COMPARISON_FILE).is_file():
        t0 = time.perf_counter()
        holdout = [(Path(s.path), unlabeled[Path(s.path).name]) for s in split.test]
        comparison = compare_bundles(current, candidate, holdout, labeled, options.backend, options.threads)
        comparison["pool"] = {
            "dir": None if pool_dir is None else str(Path(pool_dir).resolve()), "unlabeled": len(unlabeled),
            "labeled": len(labeled), "train": len(split.train), "kept_by_llb": meta.train_images,
            "holdout_fraction": cfg.data.test_fraction, "seed": cfg.data.split_seed,
        }
        write_json(report_dir / COMPARISON_FILE, comparison)
        timing["compare_s"] = time.perf_counter() - t0
    return judge(work, options, timing=timing, started=started)


def judge(
    work_dir: str | Path,
    options: RetrainOptions,
    *,
    timing: dict[str, float] | None = None,
    started: float | None = None,
) -> RetrainDecision:
    """Apply ``options.gate`` to a retrain's saved comparison, write decision.json and the report, and
    promote into ``options.versions_root`` when it passes (notifying ``options.notify_endpoints``, unless
    ``options.promote_if_passed`` is False). Also re-judges a finished retrain under another gate
    without retraining."""
    gate, versions_root = options.gate, options.versions_root
    from llb_edge.trainer.retrain_report import write_report

    work = Path(work_dir)
    report_dir = work / REPORT_DIR
    if not (report_dir / COMPARISON_FILE).is_file():
        raise RetrainError(f"{work} holds no {REPORT_DIR}/{COMPARISON_FILE}: not a finished retrain")
    comparison = read_json(report_dir / COMPARISON_FILE)
    earlier = read_json(report_dir / DECISION_FILE) if (report_dir / DECISION_FILE).is_file() else None
    if timing is None and earlier is not None:  # a re-judgement keeps the cycle's training timings
        timing = {k: v for k, v in earlier.get("timing", {}).items() if k not in ("report_s", "promote_s")}
    timing = dict(timing or {})
    history = [*earlier.get("earlier_decisions", []), {k: earlier.get(k) for k in (
        "passed", "promoted", "gate", "decided_at")}] if earlier else []
    checks = evaluate_gate(comparison, gate)
    decision = RetrainDecision(
        passed=all(c.passed for c in checks), promoted=False,
        candidate_version=comparison["candidate"]["model_version"],
        current_version=comparison["current"]["model_version"], checks=checks, work_dir=work,
        candidate_dir=work / CANDIDATE_DIR, report_dir=report_dir, timing=timing,
    )
    t0 = time.perf_counter()
    write_report(report_dir, comparison, decision.to_dict() | {"gate": asdict(gate)})
    timing["report_s"] = time.perf_counter() - t0
    will_promote = decision.passed and options.promote_if_passed and versions_root is not None
    # Written before promoting too, so the report copied into the versions folder carries it.
    extra = {"gate": asdict(gate), "decided_at": utc_now(), "earlier_decisions": history}
    write_json(decision.decision_path, decision.to_dict() | extra | {"promoted": "pending" if will_promote else False})
    if will_promote:
        assert versions_root is not None  # will_promote requires it
        t0 = time.perf_counter()
        reason = f"retrain {work.name}: gate passed (" + "; ".join(c.detail for c in checks) + ")"
        decision.promotion = promote(versions_root, decision.candidate_dir, report_dir, options.notify_endpoints,
                                     reason=reason, by=options.by or operator_name())
        decision.promoted = True
        timing["promote_s"] = time.perf_counter() - t0
    if started is not None:
        timing["total_s"] = time.perf_counter() - started
    write_json(decision.decision_path, decision.to_dict() | extra)
    log.info("retrain %s: gate %s, %s", work.name, "passed" if decision.passed else "failed",
             "promoted" if decision.promoted else "not promoted")
    return decision
