"""Dinomaly pieces pinned against method.md sections 3 and 5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import VITS14
from safetensors.torch import save_file

from llb_edge.metrics import top_fraction_mean
from llb_edge.models.dinomaly import (
    AnomalyScorer,
    DinoEncoder,
    LinearAttention,
    NoisyBottleneck,
    create_dinomaly,
    create_timm_vit,
    encoder_spec,
    gaussian_kernel,
)
from llb_edge.models.weights import WeightsError, load_encoder_weights


def test_vit_base_has_the_paper_trainable_parameter_count():
    model, _ = create_dinomaly("vit_base_patch14_dinov2", 392)
    assert sum(p.numel() for p in model.trainable_parameters()) == 61_425_408
    assert all(not p.requires_grad for p in model.encoder.parameters())


@pytest.mark.parametrize("encoder", ["test_tiny_patch14", "test_tiny_patch14_reg4"])
def test_shapes_and_encoder_stops_after_last_tap(encoder):
    model, record = create_dinomaly(encoder, 56)
    assert record["source"] == "random"
    assert len(model.encoder.blocks) == 10  # blocks 10 and 11 are never built into the graph
    enc, dec = model(torch.randn(2, 3, 56, 56))
    assert [tuple(t.shape) for t in enc] == [(2, 32, 4, 4)] * 2
    assert [tuple(t.shape) for t in dec] == [(2, 32, 4, 4)] * 2
    prefix = 5 if encoder.endswith("reg4") else 1
    assert model.encode(torch.randn(1, 3, 56, 56)).fused.shape == (1, prefix + 16, 32)


@pytest.mark.parametrize("encoder", ["test_tiny_patch14", "test_tiny_patch14_reg4"])
def test_taps_equal_timm_blocks_at_pretraining_size(encoder):
    """At 518 px no resampling happens, so our taps must equal timm's own intermediate outputs."""
    torch.manual_seed(0)
    vit = create_timm_vit(encoder_spec(encoder))
    ours = DinoEncoder(vit, 518)(torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(1)))
    ref = vit.forward_intermediates(
        torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(1)),
        indices=list(range(2, 10)), norm=False, output_fmt="NLC", intermediates_only=True,
        return_prefix_tokens=True,
    )
    for tap, (patches, prefix) in zip(ours, ref, strict=True):
        torch.testing.assert_close(tap, torch.cat([prefix, patches], dim=1), rtol=1e-5, atol=1e-5)


def test_position_embedding_is_a_fixed_buffer_for_the_input_size():
    model, _ = create_dinomaly("test_tiny_patch14", 112)
    names = dict(model.named_buffers())
    assert "encoder.pos_embed" in names and names["encoder.pos_embed"].shape == (1, 1 + 8 * 8, 32)
    assert "encoder.pos_embed" not in dict(model.named_parameters())


def test_linear_attention_matches_the_per_token_formula():
    torch.manual_seed(0)
    attn = LinearAttention(8, 2)
    x = torch.randn(1, 5, 8)
    q, k, v = attn.qkv(x).reshape(1, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    heads = []
    for h in range(2):
        rows = []
        for n in range(5):
            kv = sum(torch.outer(phi_k[0, h, s], v[0, h, s]) for s in range(5))
            z = 1.0 / (phi_q[0, h, n] @ phi_k[0, h].sum(0) + 1e-6)
            rows.append(z * phi_q[0, h, n] @ kv)
        heads.append(torch.stack(rows))
    expected = attn.proj(torch.cat(heads, dim=-1).unsqueeze(0))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_noisy_bottleneck_drops_in_training_only():
    torch.manual_seed(0)
    neck = NoisyBottleneck(16, dropout=0.2)
    x = torch.randn(4, 10, 16)
    neck.eval()
    torch.testing.assert_close(neck(x), neck.fc2(neck.act(neck.fc1(x))))
    neck.train()
    assert not torch.allclose(neck(x), neck(x))


def test_trainable_init_is_truncated_normal_with_zero_bias():
    model, _ = create_dinomaly("vit_small_patch14_dinov2", 56)
    weights = torch.cat([m.weight.flatten() for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)])
    assert weights.abs().max() <= 0.03 + 1e-7
    assert 0.008 < weights.std().item() < 0.0105  # std 0.01 before the +-3 sigma cut
    biases = [m.bias for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert all(torch.count_nonzero(b) == 0 for b in biases)
    norms = [m for m in model.decoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(torch.all(n.weight == 1) and n.eps == 1e-8 for n in norms)


def test_gaussian_kernel_is_normalised_5x5_sigma4():
    kernel = gaussian_kernel(5, 4.0)
    assert kernel.shape == (5, 5)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
    g = np.exp(-(np.arange(-2, 3) ** 2) / 32.0)
    np.testing.assert_allclose(kernel.numpy(), np.outer(g, g) / np.outer(g, g).sum(), rtol=1e-6)


def test_anomaly_map_and_score_on_hand_made_features():
    scorer = AnomalyScorer(input_size=56, map_size=256)
    assert scorer.top_k == 655  # 1% of 256 x 256
    enc = [torch.ones(1, 4, 4, 4), torch.ones(1, 4, 4, 4)]
    same, score, peak = scorer(enc, [t.clone() for t in enc])
    assert same.shape == (1, 1, 256, 256) and torch.all(same.abs() < 1e-6)
    assert score.item() == pytest.approx(0.0, abs=1e-6) and peak.item() == pytest.approx(0.0, abs=1e-6)
    # Opposite vectors: cosine distance 2 everywhere; zero padding only lowers the 2-pixel border.
    opposite, score, peak = scorer(enc, [-t for t in enc])
    interior = opposite[0, 0, 2:-2, 2:-2]
    assert torch.allclose(interior, torch.full_like(interior, 2.0), atol=1e-5)
    assert peak.item() == pytest.approx(2.0, abs=1e-5) and score.item() == pytest.approx(2.0, abs=1e-5)
    # One orthogonal patch: the score is exactly the mean of the 655 highest map pixels.
    dec = [t.clone() for t in enc]
    dec[0][0, :, 1, 2] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    smooth, score, peak = scorer(enc, dec)
    flat = smooth.flatten().numpy()
    assert score.item() == pytest.approx(float(np.sort(flat)[-655:].mean()), rel=1e-5)
    assert score.item() == pytest.approx(float(top_fraction_mean(smooth[0, 0].numpy(), 0.01)), rel=1e-5)
    assert peak.item() == pytest.approx(float(flat.max()), rel=1e-6)
    assert 0 < score.item() < peak.item() <= 0.5  # half the channels agree: distance 1 averaged over 2 groups


def test_real_vits14_weights_load_and_are_recorded():
    vit = create_timm_vit(encoder_spec("vit_small_patch14_dinov2"))
    record = load_encoder_weights(vit, encoder_spec("vit_small_patch14_dinov2"), str(VITS14))
    assert record["sha256"] == "dc75e3ddfb5c5c7ccd76eb1cdf4deda601bece43fdfdf8ac2a64fea6c64eb0b7"


def test_wrong_or_missing_weights_fail_with_a_useful_message(tmp_path):
    spec = encoder_spec("test_tiny_patch14")
    with pytest.raises(WeightsError, match="shape mismatches.*model.encoder"):
        load_encoder_weights(create_timm_vit(spec), spec, str(VITS14))
    with pytest.raises(WeightsError, match="does not exist.*Supply weights"):
        load_encoder_weights(create_timm_vit(spec), spec, str(tmp_path / "nope.safetensors"))
    partial = {k: v for k, v in create_timm_vit(spec).state_dict().items() if "blocks.3." not in k}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightsError, match="missing keys"):
        load_encoder_weights(create_timm_vit(spec), spec, str(tmp_path / "partial.safetensors"))


def test_meta_dinov2_checkpoint_with_registers_loads(tmp_path):
    """A Meta-format .pth (register_tokens, CLS position in pos_embed, mask_token) maps onto timm."""
    spec = encoder_spec("test_tiny_patch14_reg4")
    source = create_timm_vit(spec)
    timm_state = source.state_dict()
    cls_pos = torch.randn(1, 1, 32)
    meta = {k: v.clone() for k, v in timm_state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    meta["register_tokens"] = timm_state["reg_token"]
    meta["cls_token"] = timm_state["cls_token"] - cls_pos
    meta["pos_embed"] = torch.cat([cls_pos, timm_state["pos_embed"]], dim=1)
    meta["mask_token"] = torch.zeros(1, 32)
    torch.save(meta, tmp_path / "dinov2_tiny_reg4.pth")
    target = create_timm_vit(spec)
    record = load_encoder_weights(target, spec, str(tmp_path / "dinov2_tiny_reg4.pth"))
    assert record["sha256"]
    for key, value in timm_state.items():
        torch.testing.assert_close(target.state_dict()[key], value)
