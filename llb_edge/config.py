"""The one config system: typed dataclasses, loaded from TOML or JSON, overridden from the CLI.

Every run writes its resolved config (``config.json``) next to its outputs, so a run directory
alone says how it was made. Overrides use dotted keys (``train.iterations=200``) and are converted
to the field's declared type, so a typo or a wrong type fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llb_edge.errors import LLBEdgeError


class ConfigError(LLBEdgeError, ValueError):
    """A config file or override that does not match the schema."""


@dataclass
class DataConfig:
    # mtd | mvtec | visa | realiad | folder | elpv
    dataset: str = "mtd"
    root: str = "../shared/data/mtd"
    # MVTec/VisA/Real-IAD category; ignored by single-category layouts.
    category: str = ""
    # Real-IAD: the folder of split JSONs (e.g. realiad_jsons_fuiad_0.1); empty: realiad_jsons.
    split_dir: str = ""
    # Folder dataset: normal images, optional defect images and their masks (relative to root).
    normal_dir: str = "good"
    defect_dir: str = ""
    mask_dir: str = ""
    # Seeded split for layouts that ship none: this fraction of normal images goes to test.
    test_fraction: float = 0.2
    split_seed: int = 0
    # Optional caps, useful for smoke runs on CPU (0 = all).
    max_train: int = 0
    max_test: int = 0
    # Synthetic contamination (method.md section 7): move int(alpha * |train|) defective test images
    # into train, unlabeled as far as training is concerned. 0 = the dataset as shipped.
    contamination: float = 0.0
    # Pre-processing: resize the frame to resize x resize (aspect not kept), then centre-crop crop x crop.
    # The default resizes straight to the model's input (crop == resize): the whole frame is inspected.
    # The Dinomaly paper resizes to 448 and crops 392, dropping a border ring of 23% of the area that
    # the model then never sees: set resize = 448 only for paper-comparable benchmarks (configs/mtd.toml).
    resize: int = 392
    crop: int = 392
    # error: stop on a corrupt file before training starts; skip: warn and drop it.
    on_bad_file: str = "error"


@dataclass
class ModelConfig:
    # An encoder name from llb_edge.models.dinomaly.ENCODERS.
    encoder: str = "vit_small_patch14_dinov2"
    # A local .safetensors (timm layout) or Meta .pth, "timm" for the hub, or "random" (tests only).
    weights: str = "../shared/weights/dinov2_vits14.safetensors"
    dropout: float = 0.2


@dataclass
class TrainConfig:
    iterations: int = 5000
    batch_size: int = 16
    lr: float = 2e-3
    final_lr: float = 2e-4
    warmup_iterations: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    # Hard-mining keep fraction p ramps from 0 to hm_max over hm_ramp_iterations.
    hm_max: float = 0.9
    hm_ramp_iterations: int = 1000
    hm_factor: float = 0.1
    seed: int = 0
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    # fp32 | bf16 (autocast; GPU recommended)
    precision: str = "fp32"
    checkpoint_every: int = 500
    # Compute frozen encoder features once and reuse them: much faster, equal up to the fp16 rounding
    # of the cache (<= 4e-4 relative on stage-1 scores, tests/test_llb.py).
    cache_features: bool = True
    # Where cached features live: auto (device memory if it fits, else host, else disk) | device | host | disk
    cache_location: str = "auto"
    # Bound on host/device memory the feature cache may take before spilling to disk, in GiB.
    cache_budget_gb: float = 8.0
    # Calibration slice (docs/bundle.md): this fraction of the training images, at least
    # calibration_min of them and at most half, is held back from training and scored by the final
    # model at the end; the exporter sets the threshold for a target false-reject rate on those
    # scores. 0 disables it (the exporter then falls back to the training-score quantile rule).
    calibration_fraction: float = 0.15
    calibration_min: int = 20
    # training: a random slice of the whole training set, held back before LLB stage 1 (representative
    # of the line; unlabelled defects in it make the threshold conservative). kept: a slice of D_pure
    # after screening (defect-free, but D_pure is the easiest part of the set: it can promise too few
    # false rejects).
    calibration_source: str = "training"


# The paper's fixed keep fraction t: a benchmark setting, kept for paper-comparable runs (llb.keep=0.4).
PAPER_KEEP = 0.4


@dataclass
class LLBConfig:
    # Which stages run: "1,2" (LLB) or "2" (no screening: the baseline).
    stages: str = "1,2"
    k: int = 5
    # Where the consensus ranking is cut. "auto" (default): an image is suspect when its consensus score
    # lies more than ``outlier_z`` robust standard deviations above the median (the scale is estimated
    # from the scores below the median, which contamination does not reach), so a clean set loses almost
    # nothing and clear outliers go. A number in (0, 1] keeps that fraction of the lowest-scored images
    # whatever the data (the paper's benchmark setting: 0.4). docs/llb.md has the measurements.
    keep: str = "auto"
    outlier_z: float = 2.5
    # What happens to the images above the cut. "mask": they stay in the training set but their
    # suspect patches (patch score above the cut, dilated by one patch) are left out of the stage-2
    # loss, so the normal part of a defective image still teaches the decoder. "drop": they leave the
    # training set (the paper).
    above_cut: str = "mask"
    # knn (default: training-free, ranks the planted defects better than short-trained Dinomaly
    # sub-models, docs/llb.md) | dinomaly (the paper's sub-model)
    submodel: str = "knn"
    submodel_iterations: int = 1000
    # knn sub-model: memory-bank size bound (patch features kept per sub-model).
    knn_bank_size: int = 20000
    # Sub-models trained at once on one GPU (CUDA streams): 1 = one after another (bit-reproducible),
    # 0 = as many as fit, N = at most N.
    concurrent_submodels: int = 1
    seed: int = 0
    # The sub-models' weights (knn: memory banks) are needed only by stage 1 itself (patch masks,
    # report), so a completed run deletes them (gigabytes for large encoders); true keeps them.
    keep_submodel_weights: bool = False

    @property
    def keep_fraction(self) -> float | None:
        """The fixed keep fraction, or None for the automatic cut (NaN for an unparsable value)."""
        if self.keep == "auto":
            return None
        try:
            return float(self.keep)
        except ValueError:
            return math.nan


@dataclass
class EvalConfig:
    map_size: int = 256
    gaussian_sigma: float = 4.0
    gaussian_kernel: int = 5
    top_fraction: float = 0.01
    overlays: int = 8
    batch_size: int = 16


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    llb: LLBConfig = field(default_factory=LLBConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a TOML/JSON/CLI value to the declared field type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            if option is type(None) and value in (None, "none", "None"):
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} matches none of {annotation}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation in (int, float, str):
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if annotation is not str and isinstance(value, bool):
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
        try:
            return annotation(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}") from err
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def _apply(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key {dotted!r} (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a table of settings, got {value!r}")
            _apply(current, value, prefix=f"{dotted}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.iterations=200", "name=x"]`` into a nested dict."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        node = nested
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value.strip()
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the TOML/JSON file, then the overrides; validated."""
    config = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"config file {path} does not parse: {err}") from err
        _apply(config, values)
    if overrides:
        _apply(config, parse_overrides(overrides))
    validate(config)
    return config


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    config = RunConfig()
    _apply(config, values)
    validate(config)
    return config


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: RunConfig) -> None:
    data, train, llb = config.data, config.train, config.llb
    _check(data.on_bad_file in ("error", "skip"), "data.on_bad_file must be error or skip")
    _check(0.0 < data.test_fraction < 1.0, "data.test_fraction must be in (0, 1)")
    _check(data.crop <= data.resize, "data.crop must not exceed data.resize")
    _check(0.0 <= data.contamination < 1.0, "data.contamination must be in [0, 1)")
    _check(0.0 <= train.calibration_fraction < 1.0, "train.calibration_fraction must be in [0, 1)")
    _check(train.calibration_min >= 0, "train.calibration_min must be >= 0")
    _check(train.calibration_source in ("training", "kept"), "train.calibration_source must be training or kept")
    _check(train.iterations > 0 and train.batch_size > 0, "train.iterations and batch_size must be > 0")
    _check(train.precision in ("fp32", "bf16"), "train.precision must be fp32 or bf16")
    _check(train.cache_location in ("auto", "device", "host", "disk"),
           "train.cache_location must be auto, device, host or disk")
    _check(set(llb.stages.replace(" ", "").split(",")) <= {"1", "2"} and llb.stages.strip() != "",
           "llb.stages must be '1,2' or '2'")
    _check(llb.k >= 1, "llb.k must be >= 1")
    _check(llb.concurrent_submodels >= 0, "llb.concurrent_submodels must be >= 0")
    _check(llb.keep == "auto" or 0.0 < llb.keep_fraction <= 1.0, "llb.keep must be auto or a fraction in (0, 1]")
    _check(llb.outlier_z > 0, "llb.outlier_z must be > 0")
    _check(llb.above_cut in ("mask", "drop"), "llb.above_cut must be mask or drop")
    _check(llb.submodel in ("dinomaly", "knn"), "llb.submodel must be dinomaly or knn")


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def write_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
