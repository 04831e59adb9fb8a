"""Dinomaly: frozen DINOv2 encoder, noisy bottleneck, linear-attention decoder (method.md sections 3, 5).

The pieces are small modules so each can be tested on its own and exported to ONNX as-is:

- ``DinoEncoder`` runs a timm DINOv2 ViT up to the last tapped block and returns the taps;
- ``NoisyBottleneck`` and ``LinearAttentionBlock`` form the trainable reconstruction path;
- ``Dinomaly`` groups encoder and decoder layers for loose reconstruction;
- ``AnomalyScorer`` turns the groups into the evaluation map and the image scores;
- ``InspectionModel`` is the deployable graph: uint8 NHWC in, map and scores out.

Only the trainer and exporters import this module (it needs torch and timm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from llb_edge.data.transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class EncoderSpec:
    timm_name: str
    embed_dim: int
    num_heads: int
    num_registers: int = 0
    patch_size: int = 14
    # Extra timm kwargs: lets tests build a tiny ViT with the real DINOv2 structure.
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


ENCODERS: dict[str, EncoderSpec] = {
    "vit_small_patch14_dinov2": EncoderSpec("vit_small_patch14_dinov2", 384, 6),
    "vit_base_patch14_dinov2": EncoderSpec("vit_base_patch14_dinov2", 768, 12),
    "vit_small_patch14_reg4_dinov2": EncoderSpec("vit_small_patch14_reg4_dinov2", 384, 6, num_registers=4),
    "vit_base_patch14_reg4_dinov2": EncoderSpec("vit_base_patch14_reg4_dinov2", 768, 12, num_registers=4),
    # Random-weight stand-ins with the real DINOv2 block structure, for tests and timing only.
    "test_tiny_patch14": EncoderSpec(
        "vit_small_patch14_dinov2", 32, 2, timm_kwargs={"embed_dim": 32, "num_heads": 2}
    ),
    "test_tiny_patch14_reg4": EncoderSpec(
        "vit_small_patch14_reg4_dinov2", 32, 2, num_registers=4, timm_kwargs={"embed_dim": 32, "num_heads": 2}
    ),
}

# Encoder blocks tapped (0-indexed) and how taps are grouped (indices into the tap list).
TAP_BLOCKS = (2, 3, 4, 5, 6, 7, 8, 9)
GROUPS = ((0, 1, 2, 3), (4, 5, 6, 7))
# Every map value and score is a convex combination of 1 - cos similarities, so it lies in [0, 2]
# (recorded in bundles as extra.score_range: the runtime range-checks threshold overrides with it).
SCORE_RANGE = (0.0, 2.0)


def encoder_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name]


def create_timm_vit(spec: EncoderSpec) -> VisionTransformer:
    """The timm ViT at its 518 px pretraining size, so DINOv2 checkpoints load with strict=True."""
    vit = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.timm_kwargs)
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"{spec.timm_name} is a {type(vit).__name__}, not the ViT the encoder is built from")
    return vit


class DinoEncoder(nn.Module):
    """A frozen DINOv2 ViT that stops after its last tapped block.

    The position embedding is resampled once from the pretraining grid to this input size and kept
    as a buffer: antialiased bicubic resampling is not exportable, and recomputing it per call is
    wasted work for a fixed input size.
    """

    # Declared for the type checker: nn.Module's attribute lookup alone types them Tensor | Module.
    patch_proj: nn.Module  # the ViT's patch convolution (the fp16 export wraps it in a cast)
    pos_embed: torch.Tensor

    def __init__(self, vit: VisionTransformer, input_size: int, tap_blocks: tuple[int, ...] = TAP_BLOCKS) -> None:
        super().__init__()
        patch = int(vit.patch_embed.patch_size[0])
        if input_size % patch:
            raise ValueError(f"input size {input_size} is not a multiple of the patch size {patch}")
        self.grid = input_size // patch
        self.input_size = input_size
        self.tap_blocks = tuple(tap_blocks)
        self.no_embed_class = bool(vit.no_embed_class)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        if vit.pos_embed is None or vit.cls_token is None:
            raise ValueError("the encoder needs a ViT with a class token and absolute position embeddings (DINOv2)")
        self.patch_proj = vit.patch_embed.proj
        self.embed_dim = int(vit.patch_embed.proj.out_channels)  # token width, the decoder's too
        self.cls_token = vit.cls_token
        self.reg_token = vit.reg_token
        if self.reg_token is not None and not self.no_embed_class:
            raise ValueError("register tokens are only supported with DINOv2's no_embed_class layout")
        old_grid = vit.patch_embed.grid_size
        pos = resample_abs_pos_embed(
            vit.pos_embed.detach(),
            new_size=(self.grid, self.grid),
            old_size=old_grid,
            num_prefix_tokens=0 if self.no_embed_class else 1,
        )
        self.register_buffer("pos_embed", pos.clone(), persistent=False)
        self.blocks = nn.ModuleList(vit.blocks[: max(self.tap_blocks) + 1])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DinoEncoder:
        # Frozen: dropout/drop-path stay off even while the decoder trains.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        batch = x.shape[0]
        tokens = self.patch_proj(x).flatten(2).transpose(1, 2)
        prefix = [self.cls_token.expand(batch, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(batch, -1, -1))
        if self.no_embed_class:  # DINOv2 with registers: prefix tokens carry no position
            tokens = torch.cat([*prefix, tokens + self.pos_embed], dim=1)
        else:
            tokens = torch.cat([*prefix, tokens], dim=1) + self.pos_embed
        taps = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if index in self.tap_blocks:
                taps.append(tokens)
        return taps


class NoisyBottleneck(nn.Module):
    """MLP dim -> 4 dim -> dim with dropout on the input, after GELU and on the output; no residual.

    The dropout is the "noise": it stops the decoder from learning an identity map that would
    reconstruct anomalies as well as normal regions.
    """

    def __init__(self, dim: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.drop_in = nn.Dropout(dropout)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.drop_hidden = nn.Dropout(dropout)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.drop_out = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_hidden(self.act(self.fc1(self.drop_in(x))))
        return self.drop_out(self.fc2(x))


class LinearAttention(nn.Module):
    """Softmax-free attention with phi(x) = ELU(x) + 1, written with matmul and reshape only.

    No 1/sqrt(d) scale (method.md). Plain matmuls because einsum with ellipsis does not convert
    to TensorRT.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.eps = eps
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, d]
        q = F.elu(q) + 1.0
        k = F.elu(k) + 1.0
        kv = torch.matmul(k.transpose(-2, -1), v)  # [B, heads, d, d]
        k_sum = k.sum(dim=2, keepdim=True)  # [B, heads, 1, d]
        normaliser = 1.0 / ((q * k_sum).sum(dim=-1, keepdim=True) + self.eps)  # [B, heads, N, 1]
        out = torch.matmul(q, kv) * normaliser
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class LinearAttentionBlock(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-8, MLP ratio 4) with linear attention."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = LinearAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


def init_trainable(module: nn.Module) -> None:
    """Truncated normal std 0.01 (cut at +-0.03) for Linear weights, zero biases, LayerNorm 1/0."""
    for child in module.modules():
        if isinstance(child, nn.Linear):
            nn.init.trunc_normal_(child.weight, std=0.01, a=-0.03, b=0.03)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.LayerNorm):
            nn.init.ones_(child.weight)
            nn.init.zeros_(child.bias)


def tokens_to_map(tokens: torch.Tensor, num_prefix_tokens: int, grid: int) -> torch.Tensor:
    """[B, prefix + grid*grid, D] -> [B, D, grid, grid], dropping CLS and register tokens."""
    patches = tokens[:, num_prefix_tokens:, :]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid, grid)


def mean_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors, dim=0).mean(dim=0)


@dataclass
class EncoderFeatures:
    """What the decoder side needs from the frozen encoder; all a feature cache has to keep."""

    fused: torch.Tensor  # [B, tokens, D]: mean of all taps, the bottleneck input
    groups: list[torch.Tensor]  # per group [B, D, grid, grid]: reconstruction targets


class Dinomaly(nn.Module):
    def __init__(self, encoder: DinoEncoder, num_heads: int, dropout: float = 0.2, decoder_depth: int = 8) -> None:
        super().__init__()
        dim = encoder.embed_dim
        if decoder_depth % len(GROUPS):
            raise ValueError(f"decoder depth {decoder_depth} must split evenly into {len(GROUPS)} groups")
        self.encoder = encoder
        self.bottleneck = NoisyBottleneck(dim, dropout)
        self.decoder = nn.ModuleList(LinearAttentionBlock(dim, num_heads) for _ in range(decoder_depth))
        init_trainable(self.bottleneck)
        init_trainable(self.decoder)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.bottleneck.parameters(), *self.decoder.parameters()]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"trainable weights do not match this model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]} (was the run trained with another encoder?)"
            )
        self.load_state_dict(state, strict=False)

    def encode(self, x: torch.Tensor) -> EncoderFeatures:
        with torch.no_grad():
            taps = self.encoder(x)
            enc = self.encoder
            groups = [
                tokens_to_map(mean_of([taps[i] for i in group]), enc.num_prefix_tokens, enc.grid) for group in GROUPS
            ]
            return EncoderFeatures(fused=mean_of(taps), groups=groups)

    def decode(self, fused: torch.Tensor) -> list[torch.Tensor]:
        x = self.bottleneck(fused)
        outputs = []
        for block in self.decoder:
            x = block(x)
            outputs.append(x)
        # Reversed so decoder group 0 (its last blocks) faces encoder group 0 (shallow taps).
        outputs = outputs[::-1]
        per_group = len(outputs) // len(GROUPS)
        enc = self.encoder
        return [
            tokens_to_map(mean_of(outputs[g * per_group : (g + 1) * per_group]), enc.num_prefix_tokens, enc.grid)
            for g in range(len(GROUPS))
        ]

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features = self.encode(x)
        return features.groups, self.decode(features.fused)


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = torch.outer(g, g)
    return (kernel / kernel.sum()).to(torch.float32)


class AnomalyScorer(nn.Module):
    """Groups -> evaluation map and image scores, exactly as method.md section 5.

    Per group 1 - cos along channels, bilinear (align_corners=True) to the input size, mean over
    groups; then bilinear to map_size, a normalised Gaussian (zero padding), and the image score
    as the mean of the top fraction of pixels via topk (TensorRT caps TopK K at 3840).
    """

    kernel: torch.Tensor  # a buffer, declared for the type checker

    def __init__(
        self,
        input_size: int,
        map_size: int = 256,
        sigma: float = 4.0,
        kernel_size: int = 5,
        top_fraction: float = 0.01,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.map_size = map_size
        self.top_k = max(1, int(math.floor(map_size * map_size * top_fraction)))
        if self.top_k > 3840:
            raise ValueError(f"top-k of {self.top_k} pixels exceeds TensorRT's TopK limit of 3840")
        self.register_buffer("kernel", gaussian_kernel(kernel_size, sigma)[None, None], persistent=False)

    def input_size_map(self, enc_groups: list[torch.Tensor], dec_groups: list[torch.Tensor]) -> torch.Tensor:
        maps = []
        for enc, dec in zip(enc_groups, dec_groups, strict=True):
            distance = 1.0 - F.cosine_similarity(enc, dec, dim=1).unsqueeze(1)
            maps.append(F.interpolate(distance, size=(self.input_size, self.input_size), mode="bilinear",
                                      align_corners=True))
        return mean_of(maps)

    def forward(
        self, enc_groups: list[torch.Tensor], dec_groups: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        full = self.input_size_map(enc_groups, dec_groups)
        small = F.interpolate(full, size=(self.map_size, self.map_size), mode="bilinear", align_corners=False)
        smooth = F.conv2d(small, self.kernel, padding=self.kernel.shape[-1] // 2)
        flat = smooth.flatten(1)
        score = torch.topk(flat, self.top_k, dim=1).values.mean(dim=1)
        return smooth, score, flat.amax(dim=1)


def normalize_uint8_nhwc(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] RGB -> ImageNet-normalised float [B, 3, H, W]; used in training and export."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    # Cast first: TensorRT takes uint8 only at the network boundary, not through a Transpose.
    x = images.to(torch.float32).permute(0, 3, 1, 2) / 255.0
    return (x - mean) / std


class InspectionModel(nn.Module):
    """The deployable graph: uint8 NHWC images -> (evaluation map, score, max score)."""

    def __init__(self, model: Dinomaly, scorer: AnomalyScorer) -> None:
        super().__init__()
        self.model = model
        self.scorer = scorer

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc_groups, dec_groups = self.model(normalize_uint8_nhwc(images))
        return self.scorer(enc_groups, dec_groups)


def create_dinomaly(
    encoder: str,
    input_size: int,
    weights: str = "random",
    dropout: float = 0.2,
) -> tuple[Dinomaly, dict[str, Any]]:
    """Build a Dinomaly model with its encoder weights loaded; returns it and the weights record."""
    from llb_edge.models.weights import load_encoder_weights

    spec = encoder_spec(encoder)
    vit = create_timm_vit(spec)
    record = load_encoder_weights(vit, spec, weights)
    model = Dinomaly(DinoEncoder(vit, input_size), num_heads=spec.num_heads, dropout=dropout)
    return model, record
