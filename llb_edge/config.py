"""The one config system: typed dataclasses, loaded from TOML or JSON, overridden from the CLI.

The settings loader here (apply_settings) reads every settings file: a run's config (RunConfig,
below), the daemon's serve.toml (runtime/serve_options.py) and the gateway's TOML
(runtime/gateway/config.py).

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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from llb_edge.calibration import DEFAULT_CALIBRATION_OUTLIER_Z
from llb_edge.errors import LLBEdgeError

T = TypeVar("T")


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
    # Calibration scores more than this many robust standard deviations above the slice's median are
    # left out of the threshold as suspected unlabelled defects (llb_edge.calibration); 0: keep all.
    calibration_outlier_z: float = DEFAULT_CALIBRATION_OUTLIER_Z


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


# ------------------------------------------------------------------------- the settings loader
#
# Every settings file (a run's config, serve.toml, the gateway's TOML) and every layer of command-line
# settings over it goes through apply_settings: values are checked against the dataclass's declared
# field types, unknown keys are errors naming the key and where it came from, and the defaults stay
# where the dataclass declares them. File values must have the declared type (TOML and JSON are
# typed; an integer is taken for a float); command-line values are text and are converted.

COMMAND_LINE = "command line"  # the source named in errors about flags
OFF_WORDS = ("off", "none", "")  # an optional setting (``X | None``) given as one of these is None: off
_TRUE_WORDS, _FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def setting_parser(parse: Callable[[Any, str, str], Any]) -> dict[str, Any]:
    """Field metadata for a setting the loader has no type rule for: ``parse(file value, key, source)``
    gives the field's value (command-line layers pass the field's type itself)."""
    return {"parse": parse}


def _describe(annotation: Any) -> str:
    """What a value of the declared type looks like, for error messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("'off'" if option is type(None) else _describe(option) for option in args)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {len(args)}"
    if origin in (tuple, list):
        return "a list"
    if origin is dict:
        return "a table"
    if dataclasses.is_dataclass(annotation):
        return "a table of settings"
    names = {bool: "true/false", str: "a string", Path: "a path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def coerce_setting(value: Any, annotation: Any, key: str, source: str, *, text: bool = False) -> Any:
    """``value`` as the declared type ``annotation``, or ConfigError naming ``key`` and ``source``.

    ``text``: the value comes from the command line, so "200" may be an int and "off" a bool."""

    def wrong() -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {_describe(annotation)}, got {value!r}")

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in args if option is not type(None)]
        if len(options) < len(args) and (value is None or (isinstance(value, str) and value.lower() in OFF_WORDS)):
            return None
        for option in options:
            try:
                return coerce_setting(value, option, key, source, text=text)
            except ConfigError:
                continue
        raise wrong()
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise wrong()
        fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        if fixed and len(value) != len(args):
            raise wrong()
        kinds = args if fixed else [args[0]] * len(value)
        items = [coerce_setting(item, kind, f"{key}[{i}]", source, text=text)
                 for i, (item, kind) in enumerate(zip(value, kinds, strict=True))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong()
        return {str(name): coerce_setting(item, args[1], f"{key}.{name}", source, text=text)
                for name, item in value.items()}
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise wrong()
        return apply_settings(annotation(), value, source, text=text, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.lower() in _TRUE_WORDS
        raise wrong()
    if annotation in (int, float):
        if isinstance(value, bool) or (annotation is int and isinstance(value, float) and not value.is_integer()):
            raise wrong()
        if not text and not isinstance(value, int if annotation is int else int | float):
            raise wrong()
        try:
            return annotation(value)
        except (TypeError, ValueError) as err:
            raise wrong() from err
    if annotation is str:
        if text or isinstance(value, str):
            return str(value)
        raise wrong()
    if annotation is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise wrong()
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise ConfigError(f"{source}: {key}: unsupported setting type {annotation}")


def reject_unknown_keys(values: Mapping[str, Any], known: Collection[str], source: str, prefix: str = "") -> None:
    for name in values:
        if name not in known:
            raise ConfigError(
                f"{source}: unknown config key {prefix + name!r} (unknown keys are errors, so that a typo cannot fall "
                f"back to a default; known here: {', '.join(sorted(known))})")


def apply_settings(
    settings: T,
    values: Mapping[str, Any],
    source: str,
    *,
    text: bool = False,
    prefix: str = "",
    not_settable: Collection[str] = (),
) -> T:
    """``settings`` (a dataclass) with ``values`` applied: a new object; nested tables go into nested
    settings, and a table setting (``dict``) is updated key by key, so each layer (defaults, file,
    command line) overrides only what it names.

    ``source`` names where the values come from (a file, "--set") in every error; ``prefix`` is the
    dotted path of ``settings`` in it; fields in ``not_settable`` are not keys of this table.
    """
    hints = typing.get_type_hints(type(settings))
    fields = {f.name: f for f in dataclasses.fields(settings)  # type: ignore[arg-type]
              if f.init and f.name not in not_settable}
    reject_unknown_keys(values, fields, source, prefix)
    changes: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        current, parse = getattr(settings, name), fields[name].metadata.get("parse")
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[name] = apply_settings(current, value, source, text=text, prefix=f"{key}.")
            continue
        new = parse(value, key, source) if parse is not None and not text else coerce_setting(
            value, hints[name], key, source, text=text)
        changes[name] = {**current, **new} if isinstance(current, dict) and isinstance(new, dict) else new
    return dataclasses.replace(settings, **changes)  # type: ignore[type-var]


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """A TOML (or, by its suffix, JSON) settings file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {path} does not parse: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} does not hold a table of settings")
    return values


def plain_settings(value: Any) -> Any:
    """Settings as JSON-ready values (paths as text, tuples as lists, dataclasses as dicts): for logs."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_settings(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(name): plain_settings(item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain_settings(item) for item in value]
    return str(value) if isinstance(value, Path) else value


# ------------------------------------------------------------------------------- the run config


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


def apply_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """``config`` with ``--set section.key=value`` overrides applied (converted to each key's type)."""
    return apply_settings(config, parse_overrides(list(overrides)), "--set", text=True)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the TOML/JSON file, then the overrides; validated."""
    config = RunConfig()
    if path is not None:
        config = apply_settings(config, read_settings_file(path), str(path))
    config = apply_overrides(config, overrides or [])
    validate(config)
    return config


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    config = apply_settings(RunConfig(), values, "config")
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
    _check(train.calibration_outlier_z >= 0, "train.calibration_outlier_z must be >= 0 (0: no outlier cut)")
    _check(train.calibration_source in ("training", "kept"), "train.calibration_source must be training or kept")
    _check(train.iterations > 0 and train.batch_size > 0, "train.iterations and batch_size must be > 0")
    _check(train.precision in ("fp32", "bf16"), "train.precision must be fp32 or bf16")
    _check(train.cache_location in ("auto", "device", "host", "disk"),
           "train.cache_location must be auto, device, host or disk")
    _check(set(llb.stages.replace(" ", "").split(",")) <= {"1", "2"} and llb.stages.strip() != "",
           "llb.stages must be '1,2' or '2'")
    _check(llb.k >= 1, "llb.k must be >= 1")
    _check(llb.concurrent_submodels >= 0, "llb.concurrent_submodels must be >= 0")
    _check((fraction := llb.keep_fraction) is None or 0.0 < fraction <= 1.0,
           "llb.keep must be auto or a fraction in (0, 1]")
    _check(llb.outlier_z > 0, "llb.outlier_z must be > 0")
    _check(llb.above_cut in ("mask", "drop"), "llb.above_cut must be mask or drop")
    _check(llb.submodel in ("dinomaly", "knn"), "llb.submodel must be dinomaly or knn")


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def write_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
