"""Run directories: the trainer's artifact, read by `eval`, the exporters and `retrain`.

Layout (docs/runs.md)::

    <run>/config.json          resolved RunConfig
    <run>/metadata.json        RunMetadata: encoder, backbone weights record, input size, iterations, timings
    <run>/split.json           RunSplit: the train, test and calibration images the trainer read, with labels
    <run>/train_list.jsonl     the images the final model was trained on (by path)
    <run>/model.safetensors    trainable weights (bottleneck + decoder) of the final model
    <run>/train_scores.json    final model's image scores on its own training images (threshold stats)
    <run>/calibration_scores.json  its scores on the held-back calibration slice (the threshold)
    <run>/checkpoint.safetensors  resumable state while training runs (deleted when the run completes)
    <run>/train_log.jsonl      stage 2's loss and learning rate every few iterations
    <run>/metrics.json, test_scores.jsonl, overlays/  written by evaluation (metrics_bf16.json: bf16 eval)
    <run>/stage1/               LLB screening artifacts (see trainer/llb.py)

This module is the one owner of the run directory's file names and of the records in it
(:class:`RunMetadata`, :class:`RunSplit`): the trainer writes them here, everything downstream
reads them here. Only `load_inspection_model` needs torch; it imports it lazily so this module
stays light.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llb_edge.bundle import sha256_file
from llb_edge.config import RunConfig, config_from_dict
from llb_edge.data.samples import Sample, sample_from_dict, sample_to_dict
from llb_edge.errors import LLBEdgeError

if TYPE_CHECKING:
    import torch

    from llb_edge.models.dinomaly import InspectionModel

log = logging.getLogger(__name__)

CONFIG = "config.json"
METADATA = "metadata.json"
SPLIT = "split.json"
TRAIN_LIST = "train_list.jsonl"
MODEL = "model.safetensors"
TRAIN_SCORES = "train_scores.json"
CALIBRATION_SCORES = "calibration_scores.json"
CHECKPOINT = "checkpoint.safetensors"
TRAIN_LOG = "train_log.jsonl"
METRICS = "metrics.json"
TEST_SCORES = "test_scores.jsonl"
OVERLAYS = "overlays"
STAGE1 = "stage1"


class RunError(LLBEdgeError, RuntimeError):
    """A run directory that is incomplete or does not match what is asked of it."""


def metrics_name(precision: str) -> str:
    """The metrics file of an evaluation: metrics.json for fp32, metrics_<precision>.json otherwise."""
    return METRICS if precision == "fp32" else f"metrics_{precision}.json"


def write_json(path: str | Path, values: Any) -> None:
    """Write JSON atomically, so an interrupted run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path} is missing: is {path.parent} a finished llb-edge run?")
    return json.loads(path.read_text())


def read_run_config(run_dir: str | Path) -> RunConfig:
    return config_from_dict(read_json(Path(run_dir) / CONFIG))


def _newer_than_known(path: Path, version: Any, known: int) -> None:
    if not isinstance(version, int) or isinstance(version, bool) or version > known:
        raise RunError(f"{path} has schema version {version!r}; this llb-edge reads versions up to {known}. "
                       "Use the llb-edge that wrote the run.")


# ----------------------------------------------------------------------------------- metadata

METADATA_VERSION = 1
# Keys of the version-less (0) record that later versions leave to their owner: train_list.jsonl.
LEGACY_METADATA_KEYS = ("train_list", "train_paths")


@dataclass(frozen=True)
class BackboneRecord:
    """Which encoder weights a run was trained on (llb_edge.models.weights.load_encoder_weights)."""

    source: str  # "random", "timm:<name>", "embedded" or the configured file
    path: str | None  # the resolved weights file; None for random and hub weights
    sha256: str | None


@dataclass(frozen=True)
class InputSize:
    """The pre-processing the run trained at (config.json's data.resize and data.crop)."""

    resize: int
    crop: int


@dataclass(frozen=True)
class DatasetSizes:
    """The run's split: its name and how many images each side holds (split.json lists them)."""

    name: str  # the split's name, contamination included (e.g. "mtd+alpha0.1")
    train: int
    test: int


@dataclass(frozen=True)
class TrainTiming:
    """Where the final model's training time went (stage 1's is in the screening summary)."""

    encode_seconds: float
    train_seconds: float
    train_images_per_second: float


@dataclass(frozen=True)
class RunMetadata:
    """metadata.json: what a finished run was trained with and how training went.

    Written last by the trainer (its presence marks a finished run); read by export and retrain.
    """

    encoder: str
    backbone: BackboneRecord
    input: InputSize
    iterations: int
    batch_size: int
    device: str
    precision: str
    train_images: int  # images the final model trained on (train_list.jsonl)
    dataset: DatasetSizes
    stages: list[str]
    screening: dict[str, Any]  # stage 1's summary (trainer/llb.py); empty without stage 1
    timing: TrainTiming
    final_loss: float
    # Absent from runs made before the calibration slice existed.
    calibration_images: int = 0
    calibration_source: str = ""
    schema_version: int = METADATA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any, source: Path) -> RunMetadata:
        """The record of any version this llb-edge reads (0: written before records were versioned)."""
        if not isinstance(values, dict):
            raise RunError(f"{source} must hold a JSON object, got {type(values).__name__}")
        version = values.get("schema_version", 0)
        _newer_than_known(source, version, METADATA_VERSION)
        fields = {key: value for key, value in values.items() if version or key not in LEGACY_METADATA_KEYS}
        try:
            return cls(**fields | {
                "backbone": BackboneRecord(**fields["backbone"]), "input": InputSize(**fields["input"]),
                "dataset": DatasetSizes(**fields["dataset"]), "timing": TrainTiming(**fields["timing"]),
                "schema_version": METADATA_VERSION,
            })
        except (KeyError, TypeError) as err:
            raise RunError(f"{source} is not a run metadata record of version {version}: {err}") from err


def write_metadata(run_dir: str | Path, metadata: RunMetadata) -> None:
    write_json(Path(run_dir) / METADATA, metadata.to_dict())


def read_metadata(run_dir: str | Path) -> RunMetadata:
    path = Path(run_dir) / METADATA
    return RunMetadata.from_dict(read_json(path), path)


# -------------------------------------------------------------------------------------- split

SPLIT_VERSION = 1


@dataclass(frozen=True)
class RunSplit:
    """split.json: the images a run used, exactly as its trainer read them, labels included.

    ``train`` is the dataset's training side (planted defects included) that stage 1 and the
    calibration slice were drawn from; ``calibration`` the held-back slice (never trained on);
    ``test`` the images the run is evaluated on. The images stage 2 trained on are train_list.jsonl.
    Written once by the trainer; eval, export, retrain and the benches read it instead of
    re-reading the dataset, which with contamination and a test cap would give another split.
    """

    dataset: str
    train: list[Sample]
    test: list[Sample]
    calibration: list[Sample]
    schema_version: int = SPLIT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "dataset": self.dataset,
                **{side: [sample_to_dict(s) for s in getattr(self, side)] for side in ("train", "test", "calibration")}}

    @classmethod
    def from_dict(cls, values: Any, source: Path) -> RunSplit:
        if not isinstance(values, dict):
            raise RunError(f"{source} must hold a JSON object, got {type(values).__name__}")
        version = values.get("schema_version")
        _newer_than_known(source, version, SPLIT_VERSION)
        try:
            train, test, calibration = ([sample_from_dict(record) for record in values[side]]
                                        for side in ("train", "test", "calibration"))
            return cls(dataset=str(values["dataset"]), train=train, test=test, calibration=calibration)
        except (KeyError, TypeError, ValueError) as err:
            raise RunError(f"{source} is not a run split record: {err}") from err


def write_split(run_dir: str | Path, split: RunSplit) -> None:
    write_json(Path(run_dir) / SPLIT, split.to_dict())


def read_split(run_dir: str | Path) -> RunSplit:
    """The run's recorded split; for a finished run made before splits were recorded, rebuilt.

    The rebuild (logged as a warning) reads the dataset with the trainer's recipe from the run's
    config.json, and the calibration slice from calibration_scores.json: the split such a run
    trained on, as long as the dataset on this machine has not changed since (and no corrupt file
    was skipped while training: the rebuild does not decode images).
    """
    run_dir = Path(run_dir)
    path = run_dir / SPLIT
    if path.is_file():
        return RunSplit.from_dict(read_json(path), path)
    if not (run_dir / METADATA).is_file():
        raise RunError(f"{path} is missing: is {run_dir} a finished llb-edge run?")
    from llb_edge.data.readers import load_configured_split

    log.warning("%s has no %s (trained before llb-edge recorded the split): rebuilding it from %s",
                run_dir, SPLIT, CONFIG)
    try:
        split = load_configured_split(read_run_config(run_dir).data)
    except (OSError, ValueError) as err:
        raise RunError(f"{run_dir} has no {SPLIT} (trained before llb-edge recorded the split) and its dataset "
                       f"cannot be read here to rebuild it ({err}); use it where its dataset is, or re-train") from err
    calibration_paths = read_json(run_dir / CALIBRATION_SCORES)["scores"] if (
        run_dir / CALIBRATION_SCORES).is_file() else {}
    by_path = {sample.path: sample for sample in split.train}
    calibration = [by_path[p] for p in calibration_paths if p in by_path]
    return RunSplit(split.name, split.train, split.test, calibration)


def load_inspection_model(
    run_dir: str | Path, device: str = "cpu", weights_override: str | None = None
) -> tuple[InspectionModel, RunConfig, RunMetadata]:
    """Rebuild the final model of a run: encoder weights from the recorded file, trained weights from the run.

    The recorded backbone sha256 is checked so a run is never silently evaluated or exported on
    a different backbone than it was trained on.
    """
    from safetensors.torch import load_file

    from llb_edge.models.dinomaly import AnomalyScorer, InspectionModel, create_dinomaly

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    metadata = read_metadata(run_dir)
    record = metadata.backbone
    weights = weights_override or record.path or record.source
    if record.sha256 and weights not in ("random", "timm") and weights != "embedded":
        path = Path(weights)
        if not path.is_file():
            raise RunError(
                f"the run was trained on backbone weights {record.path} (sha256 {record.sha256}), "
                "which are not at that path here; pass the same file with --weights PATH"
            )
        if sha256_file(path) != record.sha256:
            raise RunError(f"backbone weights {path} differ from the ones the run was trained on "
                           f"(sha256 {record.sha256}); pass the right file with --weights PATH")
    model_path = run_dir / MODEL
    if not model_path.is_file():
        raise RunError(f"{model_path} is missing: the run has not finished training (resume it with --resume)")
    import torch

    # The training pipeline seeds before building the model; doing the same rebuilds a random-weight
    # encoder (tests, timing runs) exactly as it was trained. Real weights are unaffected.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model, _ = create_dinomaly(cfg.model.encoder, cfg.data.crop, weights, dropout=cfg.model.dropout)
    model.load_trainable_state_dict(load_file(str(model_path)))
    scorer = AnomalyScorer(
        cfg.data.crop, cfg.eval.map_size, cfg.eval.gaussian_sigma, cfg.eval.gaussian_kernel, cfg.eval.top_fraction
    )
    inspection = InspectionModel(model, scorer).to(device).eval()
    return inspection, cfg, metadata


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError("device cuda was asked for but no CUDA GPU is available here; use --device cpu")
    return device
