"""Training throughput of the Dinomaly decoder in fp32 and bf16 autocast (images/s), on this device.

Usage: python bench/train_precision.py [--encoder vit_small_patch14_dinov2] [--size 392] [--batch 16]
       [--iterations 5] [--device auto]
Features come from the frozen encoder once (as in training with the feature cache); each timed
iteration is decode + hard-mining loss + backward + clip + StableAdamW step. Random images and
random backbone weights: throughput does not depend on either.
"""

from __future__ import annotations

import argparse
import time

import torch

from llb_edge.models.dinomaly import create_dinomaly
from llb_edge.runs import resolve_device
from llb_edge.trainer.loss import global_cosine_hm_loss
from llb_edge.trainer.optim import StableAdamW


def images_per_second(encoder: str, size: int, batch: int, iterations: int, precision: str, device: str) -> float:
    target = resolve_device(device)
    torch.manual_seed(0)
    model, _ = create_dinomaly(encoder, size)
    model.to(target).train()
    features = model.encode(torch.randn(batch, 3, size, size, device=target))
    optimizer = StableAdamW(model.trainable_parameters())
    autocast = torch.autocast(target.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            decoded = model.decode(features.fused)
            loss = global_cosine_hm_loss(features.groups, [d.float() for d in decoded], 0.5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 0.1)
        optimizer.step()

    step()  # warm-up: allocations, kernel selection
    if target.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    if target.type == "cuda":
        torch.cuda.synchronize()
    return batch * iterations / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="vit_small_patch14_dinov2")
    parser.add_argument("--size", type=int, default=392)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    print("| encoder | size | batch | device | fp32 img/s | bf16 img/s |\n|---|---|---|---|---|---|")
    rates = [images_per_second(args.encoder, args.size, args.batch, args.iterations, p, args.device)
             for p in ("fp32", "bf16")]
    print(f"| {args.encoder} | {args.size} | {args.batch} | {resolve_device(args.device)} | "
          f"{rates[0]:.2f} | {rates[1]:.2f} |")


if __name__ == "__main__":
    main()
