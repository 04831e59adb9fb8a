"""The model bundle: the one artifact a line PC installs. Written by exporters, read by the runtime.

A bundle is a folder holding ``bundle.json`` (this schema) and the model files it lists. The format
is documented in docs/bundle.md. No torch here: the runtime imports this module.

Loading verifies the schema version and every listed file's sha256, so a half-copied or edited
bundle is refused with a message instead of producing wrong scores on the line.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llb_edge.errors import LLBEdgeError

SCHEMA_VERSION = 1
MANIFEST_NAME = "bundle.json"

# The ONNX graph contract every model file in a bundle honours (see docs/bundle.md).
INPUT_NAME = "images"  # uint8 [B, H, W, 3], RGB, already resized and cropped to the input size
MAP_OUTPUT = "anomaly_map"  # float32 [B, 1, map_size, map_size], the smoothed evaluation map
SCORE_OUTPUT = "score"  # float32 [B], mean of the top fraction of map pixels
MAX_OUTPUT = "score_max"  # float32 [B], max of the map


class BundleError(LLBEdgeError, RuntimeError):
    """A bundle that cannot be used: missing, wrong schema, or a file that fails its checksum."""


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


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
        return self.root / self.manifest.files[name].path

    @property
    def threshold(self) -> float:
        return self.manifest.threshold.value


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
        for name, spec in manifest.files.items():
            file_path = root / spec.path
            if not file_path.is_file():
                raise BundleError(f"bundle file {name!r} ({file_path}) is missing")
            actual = sha256_file(file_path)
            if actual != spec.sha256:
                raise BundleError(
                    f"bundle file {name!r} ({file_path}) fails its checksum: sha256 {actual}, "
                    f"bundle.json expects {spec.sha256}. The file is corrupt or was changed; re-export."
                )
    return Bundle(root=root, manifest=manifest)


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
    if not value == value or value in (float("inf"), float("-inf")):
        raise BundleError(f"threshold must be a finite number, got {value}")
    bundle = load_bundle(root, verify=False)
    old = bundle.manifest.threshold
    history = [*old.history, {"value": old.value, "method": old.method, "set_by": old.set_by, "set_at": old.set_at}]
    bundle.manifest.threshold = Threshold(
        value=float(value), method=reason, set_by=set_by or operator_name(), set_at=utc_now(), history=history,
        frr=dict(frr or {}),
    )
    write_manifest(root, bundle.manifest)
    return bundle
