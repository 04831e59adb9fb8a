"""What `llb-edge export` (:func:`llb_edge.exporters.bundle_export.export_bundle`) can be told, and its defaults.

The defaults are the ones declared in ExportOptions, and nowhere else: `llb-edge export --help`
shows them and its flags override them only when given (as `llb-edge serve` does with ServeOptions).
A module of its own, without torch, so that the CLI can show the defaults without importing the
exporter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llb_edge.bundle import ONNX_PRECISIONS
from llb_edge.calibration import DEFAULT_TARGET_FRR
from llb_edge.data.samples import Sample
from llb_edge.exporters.openvino import DEFAULT_CALIBRATION_IMAGES, DEFAULT_GATE_IMAGES
from llb_edge.exporters.parity import DEFAULT_PARITY_IMAGES
from llb_edge.exporters.tensorrt import DEFAULT_WORKSPACE_BYTES, BatchProfile
from llb_edge.exporters.threshold import DEFAULT_MARGIN, METHOD_CALIBRATED
from llb_edge.runtime.openvino_backend import PRECISIONS as OPENVINO_PRECISIONS


@dataclass(frozen=True)
class ExportOptions:
    """How a run becomes a bundle (every field is optional; the defaults export fp32 and fp16 ONNX).

    formats: "onnx", "tensorrt", "openvino" or "all" (or several). TensorRT bundles always carry
    the ONNX graphs too (the engine's source, the parity reference and the runtime's fallback). With
    "tensorrt" a missing TensorRT is an error; with "all" it is a warning and the engines are
    skipped. "openvino" adds the OpenVINO CPU variants ``openvino_precisions`` that pass the
    decision gate on this machine (rejected ones are warned about and recorded, not served).
    """

    formats: str | tuple[str, ...] = ("onnx",)
    precisions: tuple[str, ...] = ONNX_PRECISIONS  # ONNX precisions; fp32 is required (CPU runtime, parity reference)
    model_id: str | None = None  # None: the run's name
    model_version: str | None = None  # None: a UTC timestamp
    # Labelled images for the F1-max candidate and the measured false-reject and escape rates at the
    # threshold: Samples, a JSONL sample list, or "test" (the run's recorded test split).
    validation: str | Path | Sequence[Sample] | None = None
    # uint8 [N, crop, crop, 3] model inputs or image paths for the parity gate; None: the run's test images.
    images_for_parity: np.ndarray | Sequence[str] | None = None
    overwrite: bool = False  # replace an existing bundle folder
    weights: str | None = None  # backbone weights file when the path the run recorded does not exist here
    # Which candidate becomes the bundle's threshold: "calibrated" (the conformal threshold for
    # target_frr on the run's calibration slice), "quantile" or "f1max" (needs validation).
    threshold_method: str = METHOD_CALIBRATED
    target_frr: float = DEFAULT_TARGET_FRR  # false-reject rate accepted on normal parts
    threshold_margin: float = DEFAULT_MARGIN  # of the quantile rule
    parity_count: int = DEFAULT_PARITY_IMAGES
    engine_precision: str = "fp16"  # of the TensorRT engine
    engine_profile: BatchProfile | None = None  # TensorRT batch sizes; None: the builder's default
    engine_cache_dir: str | Path | None = None  # TensorRT timing cache and OpenVINO compiled models
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES  # TensorRT builder workspace
    gate_count: int = DEFAULT_GATE_IMAGES  # images of the reduced-precision decision gate stored in the bundle
    calibration_count: int = DEFAULT_CALIBRATION_IMAGES  # INT8 calibration images stored in the bundle
    openvino_precisions: tuple[str, ...] = OPENVINO_PRECISIONS
