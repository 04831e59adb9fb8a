"""Loss, optimiser, schedule, batching and resumable training (method.md section 4)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_overrides
from safetensors import safe_open
from safetensors.torch import load_file

from llb_edge.trainer.loss import easy_point_mask, global_cosine_hm_loss, hard_mining_fraction
from llb_edge.trainer.optim import StableAdamW, learning_rate
from llb_edge.trainer.train import batch_indices


def test_hard_mining_ramp():
    assert hard_mining_fraction(0) == 0.0
    assert hard_mining_fraction(500) == pytest.approx(0.45)
    assert hard_mining_fraction(1000) == pytest.approx(0.9)
    assert hard_mining_fraction(4999) == pytest.approx(0.9)


def test_easy_points_get_exactly_a_tenth_of_the_gradient():
    torch.manual_seed(0)
    enc = [torch.randn(2, 8, 5, 5)]
    dec_plain = torch.randn(2, 8, 5, 5, requires_grad=True)
    dec_mined = dec_plain.detach().clone().requires_grad_(True)
    global_cosine_hm_loss(enc, [dec_plain], p=0.0).backward()  # p = 0: no point is easy
    global_cosine_hm_loss(enc, [dec_mined], p=0.6).backward()
    easy = easy_point_mask(enc[0], dec_mined.detach(), 0.6).expand_as(dec_mined)
    hard_count = (~easy[:, 0]).sum().item()
    assert hard_count == int(2 * 5 * 5 * 0.4)  # the hardest (1 - p) fraction of all B*H*W points
    torch.testing.assert_close(dec_mined.grad[easy], 0.1 * dec_plain.grad[easy])
    torch.testing.assert_close(dec_mined.grad[~easy], dec_plain.grad[~easy])


def test_loss_is_global_cosine_per_image_averaged_over_groups():
    enc = [torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)]
    dec = [torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)]
    expected = np.mean([
        np.mean([1 - torch.nn.functional.cosine_similarity(e[i].flatten(), d[i].flatten(), dim=0).item()
                 for i in range(3)])
        for e, d in zip(enc, dec, strict=True)
    ])
    assert global_cosine_hm_loss(enc, dec, p=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_schedule_warmup_then_cosine_to_final_lr():
    total, base, final, warmup = 5000, 2e-3, 2e-4, 100
    assert learning_rate(0, total, base, final, warmup) == 0.0
    assert learning_rate(50, total, base, final, warmup) == pytest.approx(1e-3)
    assert learning_rate(100, total, base, final, warmup) == pytest.approx(base)
    midpoint = warmup + (total - 1 - warmup) / 2
    assert learning_rate(int(midpoint), total, base, final, warmup) == pytest.approx((base + final) / 2, rel=1e-3)
    assert learning_rate(total - 1, total, base, final, warmup) == pytest.approx(final, rel=1e-12)


def test_stable_adamw_equals_amsgrad_adamw_when_updates_are_not_clipped():
    """A constant gradient keeps RMS(g / sqrt(v_hat)) at exactly 1: no clipping, plain AdamW."""
    w1 = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    w2 = torch.nn.Parameter(w1.detach().clone())
    ours = StableAdamW([w1], lr=1e-2, weight_decay=1e-4)
    ref = torch.optim.AdamW([w2], lr=1e-2, betas=(0.9, 0.999), eps=1e-10, weight_decay=1e-4, amsgrad=True)
    for _ in range(5):
        for w, opt in ((w1, ours), (w2, ref)):
            w.grad = torch.tensor([0.5, -0.25, 1.0])
            opt.step()
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-7)


def test_stable_adamw_clips_a_gradient_spike():
    lr, beta2 = 1e-2, 0.999
    w = torch.nn.Parameter(torch.zeros(4))
    opt = StableAdamW([w], lr=lr, weight_decay=0.0)
    w.grad = torch.full((4,), 0.01)
    opt.step()
    before = w.detach().clone()
    w.grad = torch.full((4,), 1.0)  # 100x the running scale
    opt.step()
    v_hat = ((1 - beta2) * beta2 * 0.01**2 + (1 - beta2) * 1.0) / (1 - beta2**2)
    rms = math.sqrt(1.0 / v_hat)
    assert rms > 1
    m_hat = (0.9 * 0.1 * 0.01 + 0.1 * 1.0) / (1 - 0.9**2)
    expected_step = (lr / rms) * m_hat / (math.sqrt(v_hat) + 1e-10)
    torch.testing.assert_close(before - w.detach(), torch.full((4,), expected_step), rtol=1e-5, atol=1e-9)


def test_batches_are_seeded_epoch_permutations():
    first_epoch = np.concatenate([batch_indices(i, 10, 5, seed=3) for i in range(2)])
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert np.array_equal(batch_indices(7, 10, 4, 3), batch_indices(7, 10, 4, 3))
    assert not np.array_equal(batch_indices(0, 10, 10, 3), batch_indices(0, 10, 10, 4))
    assert len(batch_indices(0, 3, 8, 0)) == 8  # a batch larger than the set spans epochs


def checkpoint_iteration(path):
    try:
        with safe_open(str(path), "pt") as handle:
            return int(handle.metadata()["iteration"])
    except Exception:  # noqa: BLE001 - the file may be mid-replace
        return 0


@pytest.mark.timeout(300)
def test_resume_after_sigkill_reaches_the_same_weights(tmp_path):
    overrides = tiny_overrides(tmp_path / "x", train__iterations=150, train__checkpoint_every=10)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(name, *extra):
        sets = [f"--set={o}" for o in overrides if not o.startswith(("name=", "out_dir="))]
        return [sys.executable, "-m", "llb_edge.cli", "train", "--name", name, "--out-dir", str(tmp_path),
                "--no-eval", *sets, *extra]

    subprocess.run(command("straight"), check=True, env=env, cwd=REPO, capture_output=True, timeout=240)

    victim = subprocess.Popen(command("killed"), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while checkpoint_iteration(checkpoint) < 20 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = checkpoint_iteration(checkpoint)
    assert 20 <= killed_at < 150, f"the run was not interrupted mid-way (checkpoint at {killed_at})"
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    subprocess.run(command("killed", "--resume"), check=True, env=env, cwd=REPO, capture_output=True, timeout=240)
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-6, atol=1e-7)
    meta = json.loads((tmp_path / "killed" / "metadata.json").read_text())
    assert meta["iterations"] == 150
