"""OpenVINO CPU variants of a bundle (fp32, bf16, INT8): built on the target machine, gated, cached.

Run by ``llb-edge export RUN --format openvino`` (or ``all``, where OpenVINO imports) and by
``llb-edge bundle build-engine BUNDLE --engine openvino`` on a line PC holding only the bundle.
Both need only the line install plus the ``openvino`` extra (openvino, nncf): no torch. NNCF's
OpenVINO path runs without torch (tests/runtime/test_openvino.py quantises with torch blocked).

Per variant (runtime/openvino_backend.py says what each one is):

1. INT8 only: NNCF post-training quantisation of the fp32 ONNX, calibrated on the run's kept
   training images stored in the bundle (``calibration_images.npy``), with the transformer
   preset (NNCF keeps the softmax/normalisation paths in float) and the scorer left in float:
   its ``1 - cos`` values (0.01-0.3) and the Gaussian blur of the map are where every decision is
   made, and NNCF would otherwise quantise the blur's input to 8 bits. The compiled model is
   exported as a blob into the engine cache under (ONNX sha256, OpenVINO version, CPU model and
   flags, precision) and reused from there.
2. The decision gate against ONNX Runtime fp32 on the bundle's gate images (test and kept training
   images, ``gate_images.npy``) at the bundle threshold (exporters/parity.py). A cached blob is
   re-gated too. The run through the gate also measures ms per image (batch 8) on this machine,
   which the runtime uses to pick the fastest accepted variant.
3. Accepted variants become ``format = "openvino"`` entries of bundle.json with their target (CPU,
   flags, OpenVINO version, cache key, speed) and gate figures; rejected ones are recorded under
   ``extra.openvino_rejected`` with their figures, and are never served.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llb_edge.bundle import Bundle, BundleError, ModelFile, load_bundle, save_and_reload, sha256_file, utc_now
from llb_edge.errors import LLBEdgeError
from llb_edge.exporters import parity
from llb_edge.exporters.tensorrt import default_cache_dir
from llb_edge.runtime import openvino_backend as ov_backend

log = logging.getLogger(__name__)

# How many real images a bundle stores for the gate and for INT8 calibration (bundle_export).
# NNCF's default calibration subset is 300; 64 keeps the bundle and the build small, and the
# decision gate, not the calibration size, decides whether the result is good enough.
DEFAULT_CALIBRATION_IMAGES = 64
DEFAULT_GATE_IMAGES = 96
GATE_BATCH = 8  # the daemon's default max batch: the speed measured is the one served
REJECTED_KEY = "openvino_rejected"


class OpenVinoError(LLBEdgeError, RuntimeError):
    """An OpenVINO variant that cannot be built (missing package, images or graph)."""


@dataclass
class VariantBuild:
    precision: str
    path: Path  # the model file the variant runs: the bundle's fp32 ONNX, or an INT8 blob
    key: str
    cached: bool  # INT8: the blob came from the engine cache, no quantisation ran
    build_seconds: float
    ms_per_image: float
    openvino: str
    cpu: ov_backend.CpuInfo
    onnx_sha256: str
    report: parity.ParityReport
    calibration_images: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def target(self) -> dict[str, Any]:
        """What bundle.json records in ModelFile.target: where this variant was gated and how fast."""
        return {
            "openvino": self.openvino,
            **self.cpu.describe(),
            "inference_precision": ov_backend.INFERENCE_PRECISION[self.precision],
            "onnx_sha256": self.onnx_sha256,
            "cache_key": self.key,
            "ms_per_image": round(self.ms_per_image, 2),
            "gate_batch": GATE_BATCH,
            "calibration_images": self.calibration_images,
            "built": utc_now(),
        }


def import_nncf() -> Any:
    try:
        import nncf
    except ImportError as err:
        raise OpenVinoError("INT8 variants need NNCF: pip install 'llb-edge[openvino]'") from err
    return nncf


def _scorer_scope(model: Any) -> Any:
    """NNCF's ignored scope: the scorer's Gaussian blur of the map, the one quantisable op after the features.

    The blur is the only single-channel convolution (weights [1, 1, k, k]); the cosine, resizes
    and TopK around it are not operations NNCF quantises. Found by shape, not by name, so it
    survives exporter renames.
    """
    nncf = import_nncf()
    names = [op.get_friendly_name() for op in model.get_ordered_ops()
             if op.get_type_name() == "Convolution" and list(op.input(1).get_partial_shape().to_shape())[:2] == [1, 1]]
    return nncf.IgnoredScope(names=names)


def quantize_int8(onnx_path: Path, calibration: np.ndarray, blob_path: Path) -> Path:
    """NNCF post-training quantisation of ``onnx_path``, compiled and exported to ``blob_path``."""
    ov = ov_backend.import_openvino()
    nncf = import_nncf()
    if len(calibration) == 0:
        raise OpenVinoError("INT8 calibration needs at least one image")
    model = ov.Core().read_model(str(onnx_path))
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration), model_type=nncf.ModelType.TRANSFORMER,
                              ignored_scope=_scorer_scope(model))
    compiled = ov.Core().compile_model(quantized, "CPU", ov_backend.compile_config("int8", None))
    blob_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = blob_path.with_name(f".{blob_path.name}.tmp")
    tmp.write_bytes(compiled.export_model().getvalue())
    tmp.replace(blob_path)
    return blob_path


def _time_and_gate(
    onnx_fp32: Path, model_path: Path, precision: str, gate_images: np.ndarray, threshold: float,
    reference: parity.Outputs, threads: int | None,
) -> tuple[parity.ParityReport, float]:
    backend = ov_backend.OpenVinoBackend(model_path, precision=precision, max_batch=GATE_BATCH, threads=threads)
    try:
        backend.run(gate_images[:GATE_BATCH])  # first run of a shape compiles kernels: not timed
        started = time.perf_counter()
        report = parity.check_backend_parity(onnx_fp32, gate_images, backend.run, precision, "openvino",
                                             reference=reference, batch_size=GATE_BATCH, threshold=threshold)
        ms_per_image = 1000.0 * (time.perf_counter() - started) / len(gate_images)
    finally:
        backend.close()
    return report, ms_per_image


def build_variant(
    onnx_fp32: Path, precision: str, gate_images: np.ndarray, threshold: float,
    calibration: np.ndarray | None = None, reference: parity.Outputs | None = None,
    cache_dir: str | Path | None = None, threads: int | None = None, keep_rejected: bool = False,
) -> VariantBuild:
    """Build (INT8: or reuse from the cache) one variant and run it through the decision gate.

    Does not raise on a failed gate: ``report.passed`` says; a rejected INT8 blob is removed from
    the cache so it is never reused (``keep_rejected``: left for the caller, who must delete it;
    the benchmark times rejected variants too).
    """
    if precision not in ov_backend.PRECISIONS:
        raise OpenVinoError(f"OpenVINO precision must be one of {', '.join(ov_backend.PRECISIONS)}, got {precision!r}")
    version, cpu = ov_backend.openvino_version(), ov_backend.detect_cpu()
    onnx_sha = sha256_file(onnx_fp32)
    key = ov_backend.variant_cache_key(onnx_sha, version, cpu, precision)
    if reference is None:
        reference = parity.run_onnxruntime(onnx_fp32, gate_images, GATE_BATCH, threads)
    started = time.perf_counter()
    model_path, cached, calibrated = onnx_fp32, False, 0
    if precision == "int8":
        if calibration is None or len(calibration) == 0:
            raise OpenVinoError("the INT8 variant needs calibration images (the run's kept training images)")
        cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        model_path = cache_root / f"int8-{cpu.slug()}-ov{version}-{key}{ov_backend.BLOB_SUFFIX}"
        cached, calibrated = model_path.is_file(), len(calibration)
        if not cached:
            log.info("quantising %s to INT8 on %d calibration images", onnx_fp32.name, calibrated)
            quantize_int8(onnx_fp32, calibration, model_path)
    build_seconds = time.perf_counter() - started
    report, ms_per_image = _time_and_gate(onnx_fp32, model_path, precision, gate_images, threshold, reference,
                                          threads)
    log.info("openvino-%s: %s; %.1f ms/image", precision, report.summary(), ms_per_image)
    if not report.passed and precision == "int8" and not keep_rejected:
        model_path.unlink(missing_ok=True)
    return VariantBuild(precision=precision, path=model_path, key=key, cached=cached, build_seconds=build_seconds,
                        ms_per_image=ms_per_image, openvino=version, cpu=cpu, onnx_sha256=onnx_sha, report=report,
                        calibration_images=calibrated)


def variant_entry_name(build: VariantBuild) -> str:
    """bundle.json files key: one bundle may hold variants for several CPUs and OpenVINO versions."""
    return f"openvino-{build.precision}-{build.cpu.key()}-ov{build.openvino}"


def _gate_images(bundle: Bundle) -> np.ndarray:
    try:
        return parity.bundle_images(bundle, parity.GATE_IMAGES)
    except BundleError:
        # Bundles exported before the decision gate hold only the parity images.
        log.warning("bundle %s has no gate images; the decision gate uses its parity images only", bundle.root)
        return parity.bundle_parity_images(bundle)


def add_openvino_variants(
    bundle_dir: str | Path, precisions: tuple[str, ...] = ov_backend.PRECISIONS, cache_dir: str | Path | None = None,
    threads: int | None = None,
) -> tuple[Bundle, dict[str, parity.ParityReport]]:
    """Build ``precisions`` on this machine, add the accepted ones to the bundle; (bundle, rejected reports).

    The fp32 ONNX stays the source of every variant; INT8 blobs are copied into the bundle.
    """
    bundle = load_bundle(bundle_dir)
    onnx_fp32 = next((bundle.root / spec.path for spec in bundle.manifest.files.values()
                      if spec.format == "onnx" and spec.precision == "fp32"), None)
    if onnx_fp32 is None:
        raise OpenVinoError(f"bundle {bundle.root} has no fp32 ONNX graph to build OpenVINO variants from")
    gate_images = _gate_images(bundle)
    calibration = parity.bundle_images(bundle, parity.CALIBRATION_IMAGES) if "int8" in precisions else None
    reference = parity.run_onnxruntime(onnx_fp32, gate_images, GATE_BATCH, threads)
    builds = [build_variant(onnx_fp32, precision, gate_images, bundle.threshold, calibration, reference, cache_dir,
                            threads) for precision in precisions]
    rejected = {build.precision: build.report for build in builds if not build.report.passed}
    return record_variants(bundle, builds), rejected


def record_variants(bundle: Bundle, builds: list[VariantBuild]) -> Bundle:
    """Write ``builds`` into the bundle: accepted ones as files entries (INT8 blobs copied in), rejected
    ones with their figures under ``extra.openvino_rejected`` (replacing an older entry of theirs)."""
    rejections = dict(bundle.manifest.extra.get(REJECTED_KEY) or {})
    for build in builds:
        name = variant_entry_name(build)
        if not build.report.passed:
            rejections[name] = {**build.report.to_dict(), "target": build.target()}
            bundle.manifest.files.pop(name, None)
            continue
        rejections.pop(name, None)
        path = build.path
        if build.precision == "int8":
            path = bundle.root / f"model_int8_{build.cpu.slug()}_ov{build.openvino}{ov_backend.BLOB_SUFFIX}"
            shutil.copyfile(build.path, path)
        bundle.manifest.files[name] = ModelFile(
            path=path.relative_to(bundle.root).as_posix(), sha256=sha256_file(path), format=ov_backend.FORMAT,
            precision=build.precision, target=build.target(), parity=build.report.to_dict(),
        )
    bundle.manifest.extra[REJECTED_KEY] = rejections
    return save_and_reload(bundle)
