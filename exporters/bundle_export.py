"""`llb-edge export`: a finished run -> a model bundle (bundle.json + model files), gated.

Steps, each of which can refuse the export (nothing is left behind when one does):

1. rebuild the run's final model (llb_edge.runs.load_inspection_model);
2. export the ONNX graph per precision (exporters/onnx_export.py: onnx.checker + contract check);
3. the TensorRT lint (exporters/lint.py): any error-level finding fails the export;
4. the parity gate on real images (exporters/parity.py): ONNX Runtime vs the PyTorch model;
5. the threshold for the target false-reject rate from the run's held-back calibration scores
   (exporters/threshold.py), and with labelled validation images the F1-max candidate and the
   measured false-reject and escape rates at the chosen threshold;
6. the decision gate of the fp16 graph on ONNX Runtime CPU (exporters/parity.py) on the gate
   images, stored in the bundle with the INT8 calibration images (kept training images) so that
   CPU variants can be built and gated on a line PC later;
7. TensorRT engines when asked for and TensorRT imports (exporters/tensorrt.py; engines are built
   on the target machine: there, `llb-edge export RUN_DIR --format tensorrt`, or
   :func:`add_tensorrt_engine` on a copied bundle); OpenVINO CPU variants when asked for
   (``--format openvino``, exporters/openvino.py; also built on the target machine);
8. bundle.json (llb_edge.bundle schema, docs/bundle.md) with every file's sha256 and parity figures.

The bundle is assembled in a hidden sibling folder and moved into place at the end, so a failed or
interrupted export never leaves a half bundle where the runtime would look for one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llb_edge import __version__
from llb_edge.bundle import (
    INPUT_NAME,
    MANIFEST_NAME,
    MAP_OUTPUT,
    MAX_OUTPUT,
    ONNX_PRECISIONS,
    SCORE_OUTPUT,
    SCORE_RANGE_KEY,
    THRESHOLD_CANDIDATES_KEY,
    TOP_FRACTION_KEY,
    TRAINED_WEIGHTS_KEY,
    VALIDATION_KEY,
    Bundle,
    BundleManifest,
    ModelFile,
    Preprocessing,
    Threshold,
    hash_model_file,
    load_bundle,
    save_and_reload,
    sha256_file,
    utc_now,
    write_manifest,
)
from llb_edge.calibration import BUNDLE_CALIBRATION_KEY, DEFAULT_CONFIDENCE, estimate_frr
from llb_edge.config import RunConfig
from llb_edge.data.samples import ANOMALOUS, NORMAL, Sample, load_sample_list
from llb_edge.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Geometry
from llb_edge.exporters import parity
from llb_edge.exporters.export_options import ExportOptions
from llb_edge.exporters.lint import check_model
from llb_edge.exporters.onnx_export import ExportError, export_onnx
from llb_edge.exporters.openvino import add_openvino_variants
from llb_edge.exporters.parity import bundle_parity_images
from llb_edge.exporters.tensorrt import (
    DEFAULT_WORKSPACE_BYTES,
    BatchProfile,
    EngineBuild,
    TensorRTError,
    build_checked_engine,
    bundle_engine_name,
    import_tensorrt,
)
from llb_edge.exporters.threshold import (
    DEFAULT_MARGIN,
    METHOD_CALIBRATED,
    METHOD_F1MAX,
    METHOD_QUANTILE,
    METHODS,
    ThresholdChoice,
    calibrated_threshold,
    f1max_threshold,
    labelled_rates,
    quantile_rule,
    read_calibration_scores,
    read_train_scores,
)
from llb_edge.models.dinomaly import SCORE_RANGE
from llb_edge.runs import MODEL, TRAIN_LIST, TRAIN_SCORES, RunMetadata, load_inspection_model, read_json, read_split
from llb_edge.runtime.openvino_backend import import_openvino

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt", "openvino")
# "all": every GPU format. OpenVINO variants are asked for by name: they are built and gated for
# the CPU that will run them, which the training machine rarely is.
ALL_FORMATS = ("onnx", "tensorrt")
EXPORTED_BY = "llb-edge export"
# Exported scores on kept training images vs train_scores.json: above this, warn that the bundle's
# threshold statistics may not belong to the exported model (e.g. a run trained with bf16 features).
TRAIN_SCORE_WARN = 1e-3


def onnx_file_name(precision: str) -> tuple[str, str]:
    """(bundle.json files key, file name) of the ONNX graph of ``precision``."""
    return f"onnx-{precision}", f"model_{precision}.onnx"


def resolve_formats(formats: str | Sequence[str]) -> tuple[list[str], bool]:
    """(formats, tensorrt optional): "all" asks for every format but tolerates a missing TensorRT."""
    if isinstance(formats, str):
        formats = [formats]
    wanted = [f.strip().lower() for f in formats]
    if "all" in wanted:
        return list(ALL_FORMATS), True
    unknown = sorted(set(wanted) - set(FORMATS))
    if unknown or not wanted:
        raise ExportError(f"unknown export format(s) {unknown or wanted}; choose from onnx, tensorrt, openvino, all")
    return [f for f in FORMATS if f in wanted], False


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"{out_dir} already exists; choose another --out, or pass --overwrite to replace it")
    if not (out_dir / MANIFEST_NAME).is_file():
        # Never delete a folder that is not a bundle, whatever the flag says.
        raise ExportError(f"{out_dir} is not empty and is not a bundle (no {MANIFEST_NAME}); refusing to replace it")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with ``staging``; the old bundle is removed only once the new one is in place."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _load_images(paths: Sequence[str], geometry: Geometry) -> np.ndarray:
    from llb_edge.data.images import read_image_rgb

    out = np.empty((len(paths), geometry.crop, geometry.crop, 3), dtype=np.uint8)
    for index, path in enumerate(paths):
        out[index] = geometry.to_model_input(read_image_rgb(path))
    return out


def parity_image_set(
    run_dir: Path, cfg: RunConfig, images: np.ndarray | Sequence[str] | None, count: int
) -> tuple[np.ndarray, list[str]]:
    """Real images for the parity gate: given ones, else an even normal/defect spread of the run's test split.

    Falls back to the run's kept training images when too few test images are on this machine.
    """
    geometry = Geometry(cfg.data.resize, cfg.data.crop)
    if isinstance(images, np.ndarray):
        if images.shape[1:] != (geometry.crop, geometry.crop, 3) or images.dtype != np.uint8:
            raise ExportError(f"parity images must be uint8 [N, {geometry.crop}, {geometry.crop}, 3] "
                              f"(pre-processed model inputs), got {images.dtype} {images.shape}")
        return images, [f"<array {i}>" for i in range(len(images))]
    if images is not None:
        paths = [str(p) for p in images]
        return _load_images(paths, geometry), paths
    test = read_split(run_dir).test
    candidates = [s for s in (test[i] for i in parity.spread_indices([s.label for s in test], count))
                  if Path(s.path).is_file()]
    if len(candidates) < parity.MIN_PARITY_IMAGES:
        log.warning("only %d of the run's test images are readable here for parity; using its training images",
                    len(candidates))
        kept = [s for s in load_sample_list(run_dir / TRAIN_LIST) if Path(s.path).is_file()]
        candidates = [kept[i] for i in parity.spread_indices([s.label for s in kept], count)]
    if len(candidates) < parity.MIN_PARITY_IMAGES:
        raise ExportError(f"found only {len(candidates)} readable images for the parity gate (need "
                          f"{parity.MIN_PARITY_IMAGES}): the run's test and training images are not readable "
                          "here; export where the dataset is, or give export_bundle images_for_parity")
    paths = [s.path for s in candidates]
    return _load_images(paths, geometry), paths


def decision_image_sets(
    run_dir: Path, cfg: RunConfig, gate_count: int, calibration_count: int
) -> tuple[tuple[np.ndarray, list[str]], tuple[np.ndarray, list[str]]]:
    """((gate images, paths), (calibration images, paths)) for the decision gate and INT8 calibration.

    Calibration: an even spread of the run's kept training images (what the model calls normal).
    Gate: an even normal/defect spread of the run's test split, plus a third of kept training images the
    calibration did not use (the threshold is a quantile of their scores, so they sit near it:
    where a flipped decision is a false NG on a good part). Test images not on this machine: training only.
    """
    kept = [s for s in load_sample_list(run_dir / TRAIN_LIST) if Path(s.path).is_file()]
    chosen = set(parity.spread_indices([NORMAL] * len(kept), calibration_count))
    calibration = [kept[i] for i in sorted(chosen)]
    unused = [s for i, s in enumerate(kept) if i not in chosen]
    unused = [unused[i] for i in parity.spread_indices([NORMAL] * len(unused), gate_count // 3)]
    readable_test = [s for s in read_split(run_dir).test if Path(s.path).is_file()]
    test = [readable_test[i] for i in parity.spread_indices([s.label for s in readable_test], gate_count - len(unused))]
    gate = test + unused
    if len(gate) < parity.MIN_PARITY_IMAGES:
        gate += calibration  # a tiny run: better gated on the calibration images than not at all
    geometry = Geometry(cfg.data.resize, cfg.data.crop)
    gate_paths, calibration_paths = [s.path for s in gate], [s.path for s in calibration]
    return (_load_images(gate_paths, geometry), gate_paths), (_load_images(calibration_paths, geometry),
                                                              calibration_paths)


def store_image_set(root: Path, image_set: tuple[str, str], images: np.ndarray, sources: list[str]) -> dict[str, Any]:
    """Save an image set into the bundle folder; returns its bundle.json extra entry."""
    _, file_name = image_set
    np.save(root / file_name, images)
    return {"path": file_name, "sha256": sha256_file(root / file_name), "count": int(len(images)), "sources": sources}


def validation_samples(run_dir: Path, validation: str | Path | Sequence[Sample]) -> list[Sample]:
    """Labelled validation samples: a Sample list, a JSONL sample list, or "test" (the run's recorded test split).

    "test" is optimistic (the threshold is then tuned on the images the run was evaluated on); a
    separate labelled set from the line is the honest choice.
    """
    if isinstance(validation, str) and validation == "test":
        samples = read_split(run_dir).test
    elif isinstance(validation, str | Path):
        samples = load_sample_list(validation)
    else:
        samples = list(validation)
    labelled = [s for s in samples if s.label in (NORMAL, ANOMALOUS)]
    if len({s.label for s in labelled}) < 2:
        raise ExportError("the validation set needs both normal and anomalous labelled images for an F1 threshold")
    return labelled


def _score_images(onnx_path: Path, paths: Sequence[str], geometry: Geometry, batch_size: int = 16) -> np.ndarray:
    run = parity.onnxruntime_runner(onnx_path)
    scores = []
    for start in range(0, len(paths), batch_size):
        scores.append(run(_load_images(paths[start : start + batch_size], geometry))[1].reshape(-1))
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def _train_score_check(run_dir: Path, onnx_path: Path, geometry: Geometry, count: int = 4) -> dict[str, Any]:
    """Exported scores of a few kept training images vs the run's train_scores.json.

    The default threshold comes from those recorded scores; this confirms they belong to the model
    being exported (same backbone, same weights, same pre-processing).
    """
    recorded = read_json(run_dir / TRAIN_SCORES).get("scores") or {}
    paths = [p for p in sorted(recorded) if Path(p).is_file()]
    if not paths:
        return {"checked": 0}
    picked = [paths[int(i)] for i in np.unique(np.linspace(0, len(paths) - 1, min(count, len(paths))).astype(int))]
    exported = _score_images(onnx_path, picked, geometry)
    diff = float(np.max(np.abs(exported - np.asarray([recorded[p] for p in picked]))))
    if diff > TRAIN_SCORE_WARN:
        warnings.warn(f"exported scores differ from the run's recorded training scores by up to {diff:.3g}; "
                      "the default threshold may not fit this model", stacklevel=3)
    return {"checked": len(picked), "max_abs_diff": float(f"{diff:.4g}")}


@dataclass(frozen=True)
class ThresholdDecision:
    """The bundle's threshold, the candidates it was chosen from, and what is known of its error rates."""

    chosen: ThresholdChoice
    candidates: dict[str, Any]
    frr: dict[str, Any]  # calibration estimate at the chosen value; empty without a calibration slice
    calibration: np.ndarray | None
    calibration_source: str | None
    outlier_z: float | None  # the calibration slice's outlier cut; None: every calibration score counted
    validation: dict[str, Any] | None  # measured rates on labelled images at the chosen value


def choose_threshold(
    run_dir: Path, cfg: RunConfig, onnx_fp32: Path, validation: str | Path | Sequence[Sample] | None,
    threshold_method: str, target_frr: float, margin: float = DEFAULT_MARGIN,
) -> ThresholdDecision:
    """The bundle's threshold by ``threshold_method``, every candidate, the calibration estimate at
    the chosen value, and with ``validation`` the measured rates there (scored on ``onnx_fp32``)."""
    choices: dict[str, ThresholdChoice] = {METHOD_QUANTILE: quantile_rule(run_dir, margin)}
    calibration, source = read_calibration_scores(run_dir)
    outlier_z = cfg.train.calibration_outlier_z or None  # 0: no outlier cut
    if calibration is not None:
        choices[METHOD_CALIBRATED] = calibrated_threshold(calibration, target_frr, outlier_z)
    elif threshold_method == METHOD_CALIBRATED:
        log.warning("%s has no calibration slice (calibration_scores.json, train.calibration_fraction); the "
                    "threshold falls back to the training-score quantile rule, which rejects more normal parts "
                    "than it says. Re-train for a calibrated threshold.", run_dir)
        threshold_method = METHOD_QUANTILE
    scores = labels = None
    if validation is not None:
        samples = validation_samples(run_dir, validation)
        scores = _score_images(onnx_fp32, [s.path for s in samples], Geometry(cfg.data.resize, cfg.data.crop))
        labels = np.asarray([s.label for s in samples])
        choices[METHOD_F1MAX] = f1max_threshold(scores, labels)
    elif threshold_method == METHOD_F1MAX:
        raise ExportError("threshold_method f1max needs a labelled validation set (validation=...)")
    chosen = choices[threshold_method]
    if chosen.method == METHOD_CALIBRATED:
        frr = dict(chosen.details)  # carries the target it was chosen for
    else:
        frr = estimate_frr(calibration, chosen.value, outlier_z=outlier_z).to_dict() if calibration is not None else {}
    measured = labelled_rates(scores, labels, chosen.value) if scores is not None and labels is not None else None
    return ThresholdDecision(chosen, {name: c.to_dict() for name, c in choices.items()}, frr, calibration, source,
                             outlier_z, measured)


def _manifest(
    run_dir: Path, cfg: RunConfig, metadata: RunMetadata, model_id: str | None, model_version: str | None,
    threshold: ThresholdDecision, files: dict[str, ModelFile], extra: dict[str, Any],
) -> BundleManifest:
    created = utc_now()
    _, stats = read_train_scores(run_dir)
    map_size = cfg.eval.map_size
    return BundleManifest(
        model_id=model_id or cfg.name,
        model_version=model_version or dt.datetime.now(dt.UTC).strftime("%Y%m%d.%H%M%S"),
        created=created,
        source_run=str(run_dir.resolve()),
        encoder=metadata.encoder,
        weights_sha256=metadata.backbone.sha256 or "",
        preprocessing=Preprocessing(resize=cfg.data.resize, crop=cfg.data.crop, mean=IMAGENET_MEAN,
                                    std=IMAGENET_STD),
        map_size=map_size,
        outputs={MAP_OUTPUT: ["batch", 1, map_size, map_size], SCORE_OUTPUT: ["batch"], MAX_OUTPUT: ["batch"]},
        score_stats=stats,
        threshold=Threshold(value=threshold.chosen.value, method=threshold.chosen.description, set_by=EXPORTED_BY,
                            set_at=created, frr=threshold.frr),
        files=files,
        extra=extra,
    )


def _tensorrt_available(formats: list[str], optional: bool) -> tuple[list[str], list[str]]:
    """(formats to build, skip notes). A missing TensorRT fails an explicit request, warns for "all"."""
    if "tensorrt" not in formats:
        return formats, []
    try:
        import_tensorrt()
    except TensorRTError as err:
        if not optional:
            raise
        note = ("TensorRT skipped: tensorrt does not import here. Engines are built on the target machine: "
                "run `llb-edge export RUN_DIR --format tensorrt` there, or build from this bundle there.")
        warnings.warn(note, stacklevel=3)
        log.warning("%s (%s)", note, err)
        return [f for f in formats if f != "tensorrt"], [note]
    return formats, []


def _engine_file(build: EngineBuild, root: Path) -> tuple[str, ModelFile]:
    key, name = bundle_engine_name(build.gpu, build.trt_version, build.plan.precision)
    shutil.copyfile(build.engine_path, root / name)
    return key, ModelFile(path=name, sha256=sha256_file(root / name), format="tensorrt",
                          precision=build.plan.precision, target=build.target(), parity=build.parity)


def export_bundle(run_dir: str | Path, out_dir: str | Path, options: ExportOptions | None = None) -> Bundle:
    """Export the final model of ``run_dir`` into the bundle folder ``out_dir``; returns the loaded bundle.

    ``options``: what to export and how (ExportOptions; None: its defaults).
    Raises ExportError, LintError, ParityError, TensorRTError or RunError with the reason.
    """
    started = time.perf_counter()
    options = options or ExportOptions()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    wanted, tensorrt_optional = resolve_formats(options.formats)
    precisions = list(dict.fromkeys(options.precisions))
    if "fp32" not in precisions or set(precisions) - set(ONNX_PRECISIONS):
        raise ExportError(f"precisions must include fp32 and be among {', '.join(ONNX_PRECISIONS)}, got {precisions}")
    if options.threshold_method not in METHODS:
        raise ExportError(f"threshold_method must be one of {', '.join(METHODS)}, got {options.threshold_method!r}")
    if not 0.0 < options.target_frr < 1.0:
        raise ExportError(f"the target false-reject rate must be in (0, 1), got {options.target_frr}")
    _prepare_out_dir(out_dir, options.overwrite)
    wanted, skipped = _tensorrt_available(wanted, tensorrt_optional)
    if "openvino" in wanted:
        import_openvino()  # fail before the slow steps, with the install hint
    if "tensorrt" in wanted and "fp16" not in precisions and options.engine_precision == "fp16":
        precisions.append("fp16")  # strongly typed fp16 builds parse the fp16 graph

    import onnx
    import onnxruntime
    import torch

    model, cfg, metadata = load_inspection_model(run_dir, "cpu", options.weights)
    geometry = Geometry(cfg.data.resize, cfg.data.crop)
    images, image_sources = parity_image_set(run_dir, cfg, options.images_for_parity, options.parity_count)
    log.info("parity gate on %d real images", len(images))
    reference = parity.run_torch(model, images)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        files: dict[str, ModelFile] = {}
        onnx_paths: dict[str, Path] = {}
        exports: dict[str, Any] = {}
        lint_notes: dict[str, list[str]] = {}
        for precision in precisions:
            key, name = onnx_file_name(precision)
            path = staging / name
            tags = {"llb_edge.source_run": str(run_dir.resolve()), "llb_edge.version": __version__}
            result = export_onnx(model, path, precision, metadata=tags)
            findings = check_model(path, source=name)  # raises LintError on any error-level finding
            report = parity.require(parity.check_onnx_parity(model, path, images, precision, reference))
            log.info("%s: %s", name, report.summary())
            sha256, external_data = hash_model_file(staging, name, "onnx")  # external data hashed too
            files[key] = ModelFile(path=name, sha256=sha256, format="onnx", precision=precision,
                                   parity=report.to_dict(), external_data=external_data)
            onnx_paths[precision] = path
            exports[precision] = result.to_dict()
            lint_notes[precision] = [str(f) for f in findings]

        validation = options.validation
        threshold = choose_threshold(run_dir, cfg, onnx_paths["fp32"], validation, options.threshold_method,
                                     options.target_frr, options.threshold_margin)
        (gate_images, gate_sources), (calibration, calibration_sources) = decision_image_sets(
            run_dir, cfg, options.gate_count, options.calibration_count)
        if "fp16" in onnx_paths:  # ONNX Runtime fp16 on a CPU: the reduced-precision decision gate
            gate_reference = parity.run_onnxruntime(onnx_paths["fp32"], gate_images)
            decisions = parity.require(parity.check_decisions(
                gate_reference, parity.run_onnxruntime(onnx_paths["fp16"], gate_images), threshold.chosen.value,
                "fp16", "onnxruntime-cpu-fp16"))
            log.info("model_fp16.onnx decisions: %s", decisions.summary())
            files[onnx_file_name("fp16")[0]].parity["decisions"] = decisions.to_dict()
        trained = run_dir / MODEL
        extra: dict[str, Any] = {
            "input": {"name": INPUT_NAME, "shape": ["batch", cfg.data.crop, cfg.data.crop, 3], "dtype": "uint8",
                      "color": "RGB", "layout": "NHWC"},
            "backbone": dataclasses.asdict(metadata.backbone),
            TRAINED_WEIGHTS_KEY: sha256_file(trained),
            TOP_FRACTION_KEY: cfg.eval.top_fraction,
            SCORE_RANGE_KEY: list(SCORE_RANGE),
            "threshold_rule": threshold.chosen.to_dict(),
            THRESHOLD_CANDIDATES_KEY: threshold.candidates,
            parity.PARITY_IMAGES[0]: store_image_set(staging, parity.PARITY_IMAGES, images, image_sources),
            parity.GATE_IMAGES[0]: store_image_set(staging, parity.GATE_IMAGES, gate_images, gate_sources),
            parity.CALIBRATION_IMAGES[0]: store_image_set(staging, parity.CALIBRATION_IMAGES, calibration,
                                                        calibration_sources),
            "train_scores_check": _train_score_check(run_dir, onnx_paths["fp32"], geometry),
            "onnx": exports,
            "lint_warnings": lint_notes,
            "exporter": {"llb_edge": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "skipped": skipped,
        }
        if threshold.calibration is not None:
            extra[BUNDLE_CALIBRATION_KEY] = {
                "source": threshold.calibration_source,
                "count": int(len(threshold.calibration)), "confidence": DEFAULT_CONFIDENCE,
                "outlier_z": threshold.outlier_z,
                "scores": sorted(float(v) for v in threshold.calibration),
            }
        if threshold.validation is not None:
            extra[VALIDATION_KEY] = {"source": str(validation) if isinstance(validation, str | Path) else "samples",
                                   **threshold.validation}
        if "tensorrt" in wanted:
            build = build_checked_engine(onnx_paths, cfg.data.crop, images, options.engine_precision,
                                         options.engine_profile, options.engine_cache_dir, options.workspace_bytes)
            key, spec = _engine_file(build, staging)
            files[key] = spec
        extra["export_seconds"] = round(time.perf_counter() - started, 1)
        manifest = _manifest(run_dir, cfg, metadata, options.model_id, options.model_version, threshold, files, extra)
        write_manifest(staging, manifest)
        if "openvino" in wanted:
            _, rejected = add_openvino_variants(staging, options.openvino_precisions, options.engine_cache_dir)
            for precision, report in rejected.items():
                warnings.warn(f"OpenVINO {precision} rejected by the decision gate, not added: {report.summary()} "
                              f"({'; '.join(report.failures)})", stacklevel=2)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    bundle = load_bundle(out_dir)
    log.info("bundle %s written in %.1f s (threshold %.6g, %s)", out_dir, time.perf_counter() - started,
             threshold.chosen.value, threshold.chosen.description)
    return bundle


def add_tensorrt_engine(
    bundle_dir: str | Path,
    precision: str = "fp16",
    profile: BatchProfile | None = None,
    cache_dir: str | Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    strongly_typed: bool | None = None,
) -> Bundle:
    """Build a TensorRT engine from a bundle's ONNX on this machine and add it to the bundle. UNTESTED ON GPU HERE.

    For line PCs without the training run: copy the ONNX bundle over, then build here. The engine
    passes the parity gate against ONNX Runtime on the bundle's stored parity images first.
    """
    bundle = load_bundle(bundle_dir)
    onnx_paths = {spec.precision: bundle.root / spec.path for spec in bundle.manifest.files.values()
                  if spec.format == "onnx"}
    build = build_checked_engine(onnx_paths, bundle.manifest.preprocessing.crop, bundle_parity_images(bundle),
                                 precision, profile, cache_dir, workspace_bytes, strongly_typed)
    key, spec = _engine_file(build, bundle.root)
    bundle.manifest.files[key] = spec
    return save_and_reload(bundle)
