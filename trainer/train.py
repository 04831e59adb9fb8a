"""The Dinomaly training loop, readable top to bottom (method.md section 4).

Batches are a pure function of (seed, iteration), and the checkpoint holds the weights, the
optimiser state and the RNG state, so a run killed at any point and resumed reaches the same final
weights as an uninterrupted one on the same device. Checkpoints are one safetensors file replaced
atomically: tensors only, no pickle.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from llb_edge.config import TrainConfig
from llb_edge.models.dinomaly import Dinomaly
from llb_edge.trainer.features import EncodedImages
from llb_edge.trainer.loss import global_cosine_hm_loss, hard_mining_fraction
from llb_edge.trainer.optim import StableAdamW, learning_rate


def batch_indices(iteration: int, count: int, batch_size: int, seed: int) -> np.ndarray:
    """Positions for one step: a stream of seeded per-epoch permutations, cut into batches.

    Stateless, so a resumed run draws exactly the batches the uninterrupted run would have.
    """
    start = iteration * batch_size
    positions: list[int] = []
    while len(positions) < batch_size:
        epoch, offset = divmod(start + len(positions), count)
        permutation = np.random.default_rng([seed, epoch]).permutation(count)
        take = min(batch_size - len(positions), count - offset)
        positions.extend(permutation[offset : offset + take].tolist())
    return np.asarray(positions, dtype=np.int64)


@dataclass
class TrainResult:
    iterations: int
    final_loss: float
    seconds: float
    images_per_second: float


def save_checkpoint(path: Path, model: Dinomaly, optimizer: StableAdamW, iteration: int) -> None:
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    for index, param in enumerate(optimizer.param_groups[0]["params"]):
        for name, value in optimizer.state.get(param, {}).items():
            tensors[f"optim/{index}/{name}"] = value.detach().cpu().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"iteration": str(iteration)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: Dinomaly, optimizer: StableAdamW, device: torch.device) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        iteration = int(handle.metadata()["iteration"])
    tensors = load_file(str(path))
    model.load_trainable_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    params = optimizer.param_groups[0]["params"]
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            optimizer.state[params[int(index)]][name] = value if name == "step" else value.to(device)
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return iteration


def train_dinomaly(
    model: Dinomaly,
    features: EncodedImages,
    indices: np.ndarray,
    cfg: TrainConfig,
    iterations: int,
    seed: int,
    checkpoint: Path | None = None,
    resume: bool = False,
    log_path: Path | None = None,
    desc: str = "train",
    loss_weights: torch.Tensor | None = None,
) -> TrainResult:
    """Train ``model``'s bottleneck and decoder on the images at ``indices`` of ``features``.

    ``loss_weights`` [len(features), grid, grid]: per-patch weights of the loss (0 = left out), from
    LLB's patch-level screening; None: every patch counts.
    """
    device = features.device
    model.to(device).train()
    optimizer = StableAdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.manual_seed(seed)
    start = 0
    if resume and checkpoint is not None and checkpoint.is_file():
        start = load_checkpoint(checkpoint, model, optimizer, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    log = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed in finally
    loss_value, t0, seen = float("nan"), time.perf_counter(), 0
    bar = tqdm(range(start, iterations), desc=desc, initial=start, total=iterations, unit="it", dynamic_ncols=True)
    try:
        for it in bar:
            lr = learning_rate(it, iterations, cfg.lr, cfg.final_lr, cfg.warmup_iterations)
            for group in optimizer.param_groups:
                group["lr"] = lr
            p = hard_mining_fraction(it, cfg.hm_max, cfg.hm_ramp_iterations)
            chosen = indices[batch_indices(it, len(indices), cfg.batch_size, seed)]
            batch = features.batch(chosen)
            weights = None if loss_weights is None else loss_weights[torch.from_numpy(chosen)].to(device)

            with autocast:
                decoded = model.decode(batch.fused)
                loss = global_cosine_hm_loss(batch.groups, [d.float() for d in decoded], p, cfg.hm_factor, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.grad_clip)
            optimizer.step()

            seen += len(batch.fused)
            if it % 10 == 0 or it == iterations - 1:
                loss_value = loss.item()
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                if log:
                    log.write(json.dumps({"it": it, "loss": loss_value, "lr": lr, "p": p, "img_per_s": rate}) + "\n")
                    log.flush()
            done = it + 1
            if checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == iterations):
                save_checkpoint(checkpoint, model, optimizer, done)
    finally:
        bar.close()
        if log:
            log.close()
    seconds = time.perf_counter() - t0
    model.eval()
    return TrainResult(iterations, loss_value, seconds, seen / max(seconds, 1e-9))
