"""Hard-mining global cosine loss (method.md section 4).

Each image's reconstruction is scored as one vector (global cosine over C*H*W), which lets the
decoder be loose about single points; hard mining then damps the gradient of points the decoder
already reconstructs well, so training concentrates on the hardest (1 - p) fraction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hard_mining_fraction(iteration: int, p_max: float = 0.9, ramp_iterations: int = 1000) -> float:
    """p = min(p_max * it / ramp, p_max): no mining at the start, full mining after the ramp."""
    if ramp_iterations <= 0:
        return p_max
    return min(p_max * iteration / ramp_iterations, p_max)


def easy_point_mask(enc: torch.Tensor, dec: torch.Tensor, p: float) -> torch.Tensor:
    """[B,1,H,W] True where the point distance lies below the threshold keeping the hardest 1-p."""
    with torch.no_grad():
        distance = 1.0 - F.cosine_similarity(enc, dec, dim=1).unsqueeze(1)
        flat = distance.flatten()
        hard_count = int(flat.numel() * (1.0 - p))
        if hard_count <= 0:
            return torch.ones_like(distance, dtype=torch.bool)
        threshold = torch.topk(flat, hard_count).values[-1]
        return distance < threshold


def scale_gradient(tensor: torch.Tensor, mask: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; in backward, multiply the gradient at ``mask`` points by ``factor``."""
    if not tensor.requires_grad:
        return tensor
    scale = torch.where(mask, factor, 1.0).to(tensor.dtype)
    tensor.register_hook(lambda grad: grad * scale)
    return tensor


def global_cosine_hm_loss(
    enc_groups: list[torch.Tensor],
    dec_groups: list[torch.Tensor],
    p: float,
    factor: float = 0.1,
    point_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over groups of mean over images of 1 - cos(flatten(enc_i), flatten(dec_i)).

    ``point_weights`` [B, H, W] (1 = in the loss, 0 = out) leaves points out of both vectors, so a
    masked point neither counts in the cosine nor receives gradient (LLB's patch-level screening).
    """
    losses = []
    for enc, dec in zip(enc_groups, dec_groups, strict=True):
        enc = enc.detach()
        if point_weights is not None:
            weights = point_weights[:, None].to(enc.dtype)
            enc, dec = enc * weights, dec * weights
        dec = scale_gradient(dec, easy_point_mask(enc, dec, p), factor)
        cos = F.cosine_similarity(enc.flatten(1), dec.flatten(1), dim=1)
        losses.append((1.0 - cos).mean())
    return torch.stack(losses).mean()
