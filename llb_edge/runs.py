"""Run directories: the trainer's artifact, read by `eval`, the exporters and `retrain`.

Layout (docs/runs.md)::

    <run>/config.json          resolved RunConfig
    <run>/metadata.json        encoder, backbone weights record, input size, iterations, timings
    <run>/train_list.jsonl     the images the final model was trained on (by path)
    <run>/model.safetensors    trainable weights (bottleneck + decoder) of the final model
    <run>/train_scores.json    final model's image scores on its own training images (threshold stats)
    <run>/calibration_scores.json  its scores on the held-back calibration slice (the threshold)
    <run>/checkpoint.safetensors  resumable state while training runs (deleted when the run completes)
    <run>/metrics.json, overlays/  written by evaluation
    <run>/stage1/               LLB screening artifacts (see trainer/llb.py)

Only `load_inspection_model` needs torch; it imports it lazily so this module stays light.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llb_edge.bundle import sha256_file
from llb_edge.config import RunConfig, config_from_dict
from llb_edge.errors import LLBEdgeError

if TYPE_CHECKING:
    import torch

    from llb_edge.models.dinomaly import InspectionModel

CONFIG = "config.json"
METADATA = "metadata.json"
TRAIN_LIST = "train_list.jsonl"
MODEL = "model.safetensors"
TRAIN_SCORES = "train_scores.json"
CALIBRATION_SCORES = "calibration_scores.json"
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.json"
OVERLAYS = "overlays"


class RunError(LLBEdgeError, RuntimeError):
    """A run directory that is incomplete or does not match what is asked of it."""


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


def load_inspection_model(
    run_dir: str | Path, device: str = "cpu", weights_override: str | None = None
) -> tuple[InspectionModel, RunConfig, dict[str, Any]]:
    """Rebuild the final model of a run: encoder weights from the recorded file, trained weights from the run.

    The recorded backbone sha256 is checked so a run is never silently evaluated or exported on
    a different backbone than it was trained on.
    """
    from safetensors.torch import load_file

    from llb_edge.models.dinomaly import AnomalyScorer, InspectionModel, create_dinomaly

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    metadata = read_json(run_dir / METADATA)
    record = metadata["backbone"]
    weights = weights_override or (record["path"] if record["path"] else record["source"])
    if record.get("sha256") and weights not in ("random", "timm") and weights != "embedded":
        path = Path(weights)
        if not path.is_file():
            raise RunError(
                f"the run was trained on backbone weights {record['path']} (sha256 {record['sha256']}), "
                "which are not at that path here; pass the same file with --weights PATH"
            )
        if sha256_file(path) != record["sha256"]:
            raise RunError(f"backbone weights {path} differ from the ones the run was trained on "
                           f"(sha256 {record['sha256']}); pass the right file with --weights PATH")
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
