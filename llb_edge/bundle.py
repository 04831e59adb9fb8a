"""The model bundle: the one artifact a line PC installs. Written by exporters, read by the runtime.

A bundle is a folder holding ``bundle.json`` (this schema) and the model files it lists. The format
is documented in docs/bundle.md. No torch here: the runtime imports this module.

Loading verifies the schema version, the manifest's values, and the sha256 of every file a model
session reads (each listed model file and every ONNX external-data file it references), all
confined to the bundle folder, so a half-copied, edited or hostile bundle is refused with a
message instead of producing wrong scores on the line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import getpass
import hashlib
import json
import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from llb_edge.errors import LLBEdgeError
from llb_edge.onnx_external import OnnxFormatError, external_data_locations

SCHEMA_VERSION = 1
MANIFEST_NAME = "bundle.json"

# The ONNX graph contract every model file in a bundle honours (see docs/bundle.md).
INPUT_NAME = "images"  # uint8 [B, H, W, 3], RGB, already resized and cropped to the input size
MAP_OUTPUT = "anomaly_map"  # float32 [B, 1, map_size, map_size], the smoothed evaluation map
SCORE_OUTPUT = "score"  # float32 [B], mean of the top fraction of map pixels
MAX_OUTPUT = "score_max"  # float32 [B], max of the map

MODEL_FORMATS = ("onnx", "tensorrt", "openvino", "safetensors")
ONNX_PRECISIONS = ("fp32", "fp16")  # the ONNX graphs a bundle may carry (exporters/onnx_export.py)
# bundle.json ``extra`` keys that a module other than the exporter reads (docs/bundle.md lists every
# key): spelled here once; the typed accessors of :class:`Bundle` read the runtime's.
SCORE_RANGE_KEY = "score_range"  # [lo, hi] every score of the graph lies in
TOP_FRACTION_KEY = "top_fraction"  # the share of map cells the graph's score averages
TRAINED_WEIGHTS_KEY = "trained_weights_sha256"  # sha256 of the source run's model.safetensors
THRESHOLD_CANDIDATES_KEY = "threshold_candidates"  # every threshold the exporter considered
VALIDATION_KEY = "validation"  # measured rates on labelled images at the chosen threshold
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(LLBEdgeError, RuntimeError):
    """A bundle that cannot be used: missing, wrong schema, or a file that fails its checksum."""


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def is_finite_number(value: object) -> TypeGuard[int | float]:
    """A JSON number that is a real, finite value (not a bool, a string, null, NaN or infinity)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class Preprocessing:
    """How a camera frame becomes the graph input; the runtime applies exactly this."""

    resize: int  # frame resized (bilinear, aspect not kept) to resize x resize
    crop: int  # then centre-cropped to crop x crop: the graph's H and W
    color: str = "RGB"
    layout: str = "NHWC"
    dtype: str = "uint8"
    # Applied inside the graph; recorded so other consumers can reproduce it.
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class ModelFile:
    path: str  # relative to the bundle folder
    sha256: str
    format: str  # onnx | tensorrt
    precision: str  # fp32 | fp16
    # TensorRT engines: what they were built for (an engine runs only there).
    target: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    # ONNX external-data files the graph references: path relative to the bundle folder -> sha256.
    external_data: dict[str, str] = field(default_factory=dict)


@dataclass
class Threshold:
    value: float
    method: str  # e.g. "quantile 0.995 of kept training scores + 10% margin", "f1max", "operator"
    set_by: str
    set_at: str
    history: list[dict[str, Any]] = field(default_factory=list)
    # The false-reject rate the calibration slice predicts at this value (llb_edge.calibration
    # FalseRejectEstimate: target, calibration_count, expected, upper, ...); empty when unknown.
    frr: dict[str, Any] = field(default_factory=dict)


@dataclass
class BundleManifest:
    model_id: str
    model_version: str
    created: str
    source_run: str
    encoder: str
    weights_sha256: str
    preprocessing: Preprocessing
    map_size: int
    outputs: dict[str, list[Any]]
    score_stats: dict[str, Any]
    threshold: Threshold
    files: dict[str, ModelFile]
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BundleManifest:
        values = dict(values)
        try:
            values["preprocessing"] = Preprocessing(**values["preprocessing"])
            values["threshold"] = Threshold(**values["threshold"])
            values["files"] = {name: ModelFile(**spec) for name, spec in values["files"].items()}
            manifest = cls(**values)
        except (KeyError, TypeError, AttributeError) as err:  # AttributeError: "files" not an object
            raise BundleError(f"bundle.json does not match schema {SCHEMA_VERSION}: {err}") from err
        for name, spec in manifest.files.items():
            if not isinstance(spec.path, str) or not isinstance(spec.sha256, str):
                raise BundleError(f"bundle.json files.{name}: 'path' and 'sha256' must be strings")
        return manifest


@dataclass
class Bundle:
    root: Path
    manifest: BundleManifest

    def file_path(self, name: str) -> Path:
        if name not in self.manifest.files:
            available = ", ".join(sorted(self.manifest.files)) or "none"
            raise BundleError(f"bundle {self.root} has no model file {name!r} (available: {available})")
        return confined_path(self.root, self.manifest.files[name].path)

    @property
    def threshold(self) -> float:
        return self.manifest.threshold.value

    @property
    def score_range(self) -> tuple[float, float] | None:
        """[lo, hi] every score of the graph lies in, when the exporter recorded it."""
        values = self.manifest.extra.get(SCORE_RANGE_KEY)
        if isinstance(values, list | tuple) and len(values) == 2 and all(is_finite_number(v) for v in values):
            return float(values[0]), float(values[1])
        return None

    @property
    def top_fraction(self) -> float | None:
        """The share of map cells the graph's score averages, when the exporter recorded a valid one."""
        value = self.manifest.extra.get(TOP_FRACTION_KEY)
        return float(value) if is_finite_number(value) and 0 < value <= 1 else None

    @property
    def trained_weights_sha256(self) -> str | None:
        """sha256 of the source run's trained weights (model.safetensors), when recorded."""
        value = self.manifest.extra.get(TRAINED_WEIGHTS_KEY)
        return value if isinstance(value, str) and _SHA256.match(value) else None


def confined_path(root: str | Path, relative: str) -> Path:
    """``root / relative`` with symlinks resolved; BundleError unless it stays inside ``root``.

    Checked before the file is touched, so a bundle cannot make the loader open (or reveal
    anything about) a file outside its folder: ``../``, absolute paths and symlinks pointing out
    are all refused the same way.
    """
    base = Path(root).resolve()
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
        raise BundleError(f"bundle file path {relative!r} must be relative to the bundle folder")
    target = (base / relative).resolve()
    if target == base or not target.is_relative_to(base):
        raise BundleError(f"bundle file path {relative!r} leads outside the bundle folder")
    return target


def _bundle_file(root: Path, relative: str, what: str) -> Path:
    path = confined_path(root, relative)
    if not path.is_file():
        raise BundleError(f"{what} ({relative}) is missing")
    return path


def _copy_hashed(source: Path, target: Path | None) -> str:
    """sha256 of ``source``; copied to ``target`` in the same pass when given (those bytes are the
    ones hashed, whatever happens to ``source`` afterwards)."""
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(target, "xb") if target else contextlib.nullcontext() as writer:
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
            if writer is not None:
                writer.write(chunk)
    return digest.hexdigest()


def _staged(stage: Path | None, root: Path, relative: str) -> Path | None:
    if stage is None:
        return None
    target = stage / confined_path(root, relative).relative_to(root.resolve())
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _model_file_hashes(
    root: Path, relative: str, file_format: str, stage: Path | None, expected_sha256: str | None = None
) -> tuple[str, dict[str, str]]:
    """(sha256 of a model file, {external-data path: sha256}); with ``stage``, each file is also
    copied there, mirroring the bundle layout, as it is hashed. With ``expected_sha256``, a file
    that does not match is refused before its bytes are parsed for external-data references."""
    source = _bundle_file(root, relative, f"model file {relative!r}")
    target = _staged(stage, root, relative)
    sha = _copy_hashed(source, target)
    if expected_sha256 is not None and sha != expected_sha256:
        raise BundleError(
            f"bundle file {relative!r} fails its checksum (bundle.json expects {expected_sha256}). "
            "The file is corrupt or was changed; re-export."
        )
    external: dict[str, str] = {}
    if file_format == "onnx":
        try:
            locations = external_data_locations((target or source).read_bytes())
        except OnnxFormatError as err:
            raise BundleError(f"model file {relative!r} is not an ONNX protobuf: {err}") from err
        for location in locations:
            # ONNX Runtime resolves a location relative to the model file's folder.
            entry = (Path(relative).parent / location).as_posix()
            data_file = _bundle_file(root, entry, f"external data of {relative!r}")
            external[entry] = _copy_hashed(data_file, _staged(stage, root, entry))
    return sha, external


def hash_model_file(root: str | Path, relative: str, file_format: str) -> tuple[str, dict[str, str]]:
    """sha256 of a model file and of every ONNX external-data file it references (path -> sha256).

    The exporter records both in bundle.json; loading recomputes and compares them. Every path is
    confined to the bundle folder.
    """
    return _model_file_hashes(Path(root), relative, file_format, None)


def stage_model_file(bundle: Bundle, name: str, stage: Path) -> Path:
    """Copy model file ``name`` and its external data into the private folder ``stage``, checking
    each copy against bundle.json; returns the staged model file.

    A session created from the staged copy reads exactly the bytes that were checked: ONNX Runtime
    memory-maps external data, so a session on the bundle's own files would see later edits.
    """
    _verify_model_file(bundle.root, name, bundle.manifest.files[name], stage)
    return stage / confined_path(bundle.root, bundle.manifest.files[name].path).relative_to(bundle.root.resolve())


def manifest_problems(manifest: BundleManifest) -> list[str]:
    """What makes a manifest unusable for serving (wrong types, NaN, empty values), all at once."""
    problems: list[str] = []
    for name in ("model_id", "model_version"):
        if not isinstance(getattr(manifest, name), str) or not getattr(manifest, name):
            problems.append(f"{name} must be a non-empty string")
    pre = manifest.preprocessing
    sides = {"preprocessing.resize": pre.resize, "preprocessing.crop": pre.crop, "map_size": manifest.map_size}
    for name, value in sides.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if not problems and pre.crop > pre.resize:
        problems.append(f"preprocessing.crop {pre.crop} is larger than preprocessing.resize {pre.resize}")
    if not isinstance(manifest.extra, dict) or not isinstance(manifest.score_stats, dict):
        problems.append("extra and score_stats must be JSON objects")
        return problems
    threshold = manifest.threshold.value
    if not is_finite_number(threshold):
        problems.append(f"threshold.value must be a finite number, got {threshold!r}")
    score_range = manifest.extra.get(SCORE_RANGE_KEY)
    if score_range is not None:
        valid = (
            isinstance(score_range, list)
            and len(score_range) == 2
            and all(is_finite_number(v) for v in score_range)
            and score_range[0] < score_range[1]
        )
        if not valid:
            problems.append(f"extra.{SCORE_RANGE_KEY} must be [lo, hi] with finite lo < hi, got {score_range!r}")
        elif is_finite_number(threshold) and not score_range[0] <= threshold <= score_range[1]:
            problems.append(f"threshold.value {threshold} is outside extra.{SCORE_RANGE_KEY} {score_range}")
    if not manifest.files:
        problems.append("files lists no model file")
    for name, spec in manifest.files.items():
        if spec.format not in MODEL_FORMATS:
            problems.append(f"files.{name}.format must be one of {MODEL_FORMATS}, got {spec.format!r}")
        hashes = [spec.sha256, *spec.external_data.values()] if isinstance(spec.external_data, dict) else None
        if hashes is None or not all(isinstance(h, str) and _SHA256.match(h) for h in hashes):
            problems.append(f"files.{name}: every sha256 must be 64 lowercase hex digits")
    return problems


def write_manifest(root: str | Path, manifest: BundleManifest) -> Path:
    """Write bundle.json atomically (a reader never sees half a manifest)."""
    root = Path(root)
    target = root / MANIFEST_NAME
    tmp = root / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    os.replace(tmp, target)
    return target


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST_NAME} is missing (create one with llb-edge export)")
    try:
        values = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as err:  # ValueError: also UnicodeDecodeError and JSONDecodeError
        raise BundleError(f"{path} is not valid UTF-8 JSON: {err}") from err
    if not isinstance(values, dict):
        raise BundleError(f"{path} must hold a JSON object, got {type(values).__name__}")
    version = values.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{path} has schema version {version!r}; this llb-edge reads version {SCHEMA_VERSION}. "
            "Re-export the bundle with this version of llb-edge."
        )
    manifest = BundleManifest.from_dict(values)
    if verify:
        problems = manifest_problems(manifest)
        if problems:
            raise BundleError(f"{path} is not usable: " + "; ".join(problems))
        for name, spec in manifest.files.items():
            _verify_model_file(root, name, spec)
    return Bundle(root=root, manifest=manifest)


def save_and_reload(bundle: Bundle) -> Bundle:
    """Write ``bundle``'s changed manifest and load the bundle again, every file hash verified: what a
    caller holds afterwards is what is on disk."""
    write_manifest(bundle.root, bundle.manifest)
    return load_bundle(bundle.root)


def _verify_model_file(root: Path, name: str, spec: ModelFile, stage: Path | None = None) -> None:
    _, external = _model_file_hashes(root, spec.path, spec.format, stage, expected_sha256=spec.sha256)
    unlisted = sorted(set(external) - set(spec.external_data))
    if unlisted:
        raise BundleError(
            f"bundle file {name!r} reads external data {unlisted} that bundle.json does not checksum; re-export."
        )
    for entry, expected in spec.external_data.items():
        sha = external.get(entry)
        if sha is None:  # listed but not referenced: still part of the bundle, still checked
            sha = _copy_hashed(_bundle_file(root, entry, f"external data of {name!r}"), None)
        if sha != expected:
            raise BundleError(
                f"external data {entry!r} of bundle file {name!r} fails its checksum (bundle.json expects "
                f"{expected}). The file is corrupt or was changed; re-export."
            )


def operator_name() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - getuser raises many kinds when no user entry exists
        return f"uid{os.getuid()}@{socket.gethostname()}"


def set_threshold(
    root: str | Path, value: float, set_by: str | None = None, reason: str = "operator",
    frr: dict[str, Any] | None = None,
) -> Bundle:
    """Change the decision threshold in place; the old value is kept in the history.

    ``frr``: the false-reject estimate at ``value`` (llb_edge.calibration), recorded with it.
    """
    if not is_finite_number(value):
        raise BundleError(f"threshold must be a finite number, got {value}")
    bundle = load_bundle(root, verify=False)
    score_range = bundle.score_range
    if score_range is not None and not score_range[0] <= value <= score_range[1]:
        raise BundleError(f"threshold {value} is outside the bundle's score range {list(score_range)}")
    old = bundle.manifest.threshold
    history = [*old.history, {"value": old.value, "method": old.method, "set_by": old.set_by, "set_at": old.set_at}]
    bundle.manifest.threshold = Threshold(
        value=float(value), method=reason, set_by=set_by or operator_name(), set_at=utc_now(), history=history,
        frr=dict(frr or {}),
    )
    write_manifest(root, bundle.manifest)
    return bundle
