"""Stage-1 speed benchmark (issue 3, section 3): our LLB pipeline against the same pipeline run naively.

Workload (defaults): ViT-B/14 at 392 px with random weights (timing only), N = 1000 synthetic images,
k = 5 sub-models x 1000 iterations, every sub-model scoring all N images, then stage 2 x 5000
iterations, batch 16.

- ours: encoder features computed once (fp16 cache, trainer/features.py) and shared by every
  training step and scoring pass; bf16 autocast on CUDA; optionally several sub-models at once on
  CUDA streams (--concurrent).
- naive: the encoder recomputed for every batch (EncodedImages(cached=False)), fp32.

Both run the real training and scoring functions of the trainer on the same machine in one sitting.
Training steps are timed over --timed-its iterations (after a warm-up) and extrapolated to the full
iteration counts; scoring is timed on --score-images images and extrapolated to k x N. Every row of
the table says which. Image decoding is left out of both (identical work).

    python bench/stage1_speed.py                 # the GPU benchmark (needs CUDA for meaningful numbers)
    python bench/stage1_speed.py --concurrent 0  # + sub-models on CUDA streams, as many as fit
    python bench/stage1_speed.py --quick         # tiny CPU smoke run: checks the script, not the speed
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from llb_edge.config import TrainConfig
from llb_edge.models.dinomaly import AnomalyScorer, DinoEncoder, Dinomaly, create_dinomaly, encoder_spec
from llb_edge.trainer.evaluate import score_encoded
from llb_edge.trainer.features import EncodedImages
from llb_edge.trainer.submodels import run_on_streams
from llb_edge.trainer.train import train_dinomaly


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``: None reads sys.argv; bench/gpu_suite.py passes its own)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="vit_base_patch14_dinov2")
    p.add_argument("--size", type=int, default=392, help="input (crop) size in px")
    p.add_argument("--n", type=int, default=1000, help="training images")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--sub-its", type=int, default=1000)
    p.add_argument("--final-its", type=int, default=5000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--timed-its", type=int, default=200, help="training iterations timed per measurement (ours)")
    p.add_argument("--naive-timed-its", type=int, default=100, help="training iterations timed (naive)")
    p.add_argument("--warmup-its", type=int, default=10)
    p.add_argument("--score-images", type=int, default=0, help="images scored per timing (0 = all N)")
    p.add_argument("--precision", default="auto", help="ours: bf16 | fp32 | auto (bf16 on CUDA)")
    p.add_argument("--concurrent", type=int, default=1, help="ours: sub-models trained at once (CUDA streams)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0 = torch default)")
    p.add_argument("--quick", action="store_true", help="tiny CPU settings: checks that the script runs")
    args = p.parse_args(argv)
    if args.quick:
        args.encoder, args.size, args.n, args.k = "test_tiny_patch14", 56, 32, 2
        args.sub_its, args.final_its, args.batch = 20, 40, 4
        args.timed_its, args.naive_timed_its, args.warmup_its = 5, 5, 2
        args.threads = args.threads or 1  # tiny ops: extra threads only contend
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_model(encoder: DinoEncoder, heads: int, device: torch.device, seed: int = 0) -> Dinomaly:
    torch.manual_seed(seed)
    return Dinomaly(encoder, heads).to(device)


def time_training(
    encoder: DinoEncoder, heads: int, features: EncodedImages, cfg: TrainConfig, its: int, warmup: int,
    device: torch.device, concurrent: int = 1,
) -> float:
    """Seconds per training iteration of one model (with `concurrent` models training at once)."""
    positions = np.arange(len(features))
    models = [fresh_model(encoder, heads, device, seed) for seed in range(concurrent)]
    for model in models:  # warm-up: allocator, kernels, autotuning
        train_dinomaly(model, features, positions, cfg, warmup, 0, desc="warm-up")
    jobs = [lambda m=m, s=s: train_dinomaly(m, features, positions, cfg, its, s, desc="timed")
            for s, m in enumerate(models)]
    sync(device)
    t0 = time.perf_counter()
    run_on_streams(jobs, concurrent, device)
    sync(device)
    return (time.perf_counter() - t0) / (its * concurrent)


def time_scoring(
    encoder: DinoEncoder, heads: int, features: EncodedImages, scorer: AnomalyScorer, images: int,
    device: torch.device,
) -> float:
    """Seconds to score `images` images with one model."""
    model = fresh_model(encoder, heads, device)
    score_encoded(model, scorer, features, np.arange(min(images, 8)))  # warm-up
    sync(device)
    t0 = time.perf_counter()
    score_encoded(model, scorer, features, np.arange(images))
    sync(device)
    return time.perf_counter() - t0


def measure(args: argparse.Namespace) -> dict:
    """Time ours and naive; the JSON record that main() prints and writes."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    spec = encoder_spec(args.encoder)
    torch.manual_seed(0)
    base, _ = create_dinomaly(args.encoder, args.size, "random")
    base.to(device)
    encoder = base.encoder
    images = np.random.default_rng(0).integers(0, 256, (args.n, args.size, args.size, 3), dtype=np.uint8)
    scorer = AnomalyScorer(args.size).to(device)
    cfg = TrainConfig(batch_size=args.batch, device=str(device))
    score_images = min(args.score_images or args.n, args.n)

    # ---- ours: encode once (fp16 cache), bf16 on CUDA
    sync(device)
    t0 = time.perf_counter()
    ours_features = EncodedImages.from_config(base, images, device, replace(cfg, cache_budget_gb=1e9))
    sync(device)
    encode_s = time.perf_counter() - t0
    ours_cfg = replace(cfg, precision=precision)
    ours_step = time_training(encoder, spec.num_heads, ours_features, ours_cfg, args.timed_its, args.warmup_its,
                              device)
    # Stage 1 may train several sub-models at once (CUDA streams); stage 2 is one model.
    concurrent = max(1, min(args.concurrent or args.k, args.k)) if device.type == "cuda" else 1
    stage1_step = ours_step if concurrent == 1 else time_training(
        encoder, spec.num_heads, ours_features, ours_cfg, args.timed_its, args.warmup_its, device, concurrent)
    ours_score = time_scoring(encoder, spec.num_heads, ours_features, scorer, score_images, device)
    del ours_features

    # ---- naive: encoder recomputed for every batch, fp32
    naive_features = EncodedImages(base, images, device, cached=False, batch_size=args.batch)
    naive_cfg = replace(cfg, precision="fp32")
    naive_step = time_training(encoder, spec.num_heads, naive_features, naive_cfg, args.naive_timed_its,
                               args.warmup_its, device)
    naive_score = time_scoring(encoder, spec.num_heads, naive_features, scorer, score_images, device)

    score_scale = args.k * args.n / score_images
    timed = f"{args.timed_its} its timed (naive {args.naive_timed_its}), extrapolated"
    rows = [
        ("encode features once", encode_s, 0.0, f"measured, {args.n} images"),
        (f"stage 1 training ({args.k} x {args.sub_its} its)", stage1_step * args.k * args.sub_its,
         naive_step * args.k * args.sub_its, timed + (f"; {concurrent} sub-models at once" if concurrent > 1 else "")),
        (f"stage 1 scoring ({args.k} x {args.n} images)", ours_score * score_scale, naive_score * score_scale,
         f"{score_images} images timed with one model, x {score_scale:g}"),
        (f"stage 2 training ({args.final_its} its)", ours_step * args.final_its, naive_step * args.final_its, timed),
    ]
    total_ours = sum(r[1] for r in rows)
    total_naive = sum(r[2] for r in rows)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {"args": vars(args), "device": name, "precision": precision, "concurrent": concurrent,
            "rows": [{"stage": r[0], "ours_s": r[1], "naive_s": r[2], "how": r[3]} for r in rows],
            "total_ours_s": total_ours, "total_naive_s": total_naive,
            "step_s": {"ours": ours_step, "ours_concurrent": stage1_step, "naive": naive_step}}


def main() -> None:
    args = parse_args()
    record = measure(args)
    rows = [(r["stage"], r["ours_s"], r["naive_s"], r["how"]) for r in record["rows"]]
    total_ours, total_naive = record["total_ours_s"], record["total_naive_s"]
    ours_step, naive_step = record["step_s"]["ours"], record["step_s"]["naive"]
    name, precision = record["device"], record["precision"]
    print(f"\nstage-1 speed: {args.encoder} @ {args.size} px, N={args.n}, k={args.k}, batch {args.batch}, "
          f"device {name}; ours: fp16 feature cache + {precision}; naive: encoder every step, fp32")
    print(f"{'stage':<38} {'ours (s)':>10} {'naive (s)':>10} {'ratio':>7}  how")
    for label, ours, naive, how in rows:
        ratio = f"{naive / ours:.1f}x" if ours > 0 and naive > 0 else "-"
        print(f"{label:<38} {ours:>10.1f} {naive:>10.1f} {ratio:>7}  {how}")
    print(f"{'total':<38} {total_ours:>10.1f} {total_naive:>10.1f} {total_naive / total_ours:>6.1f}x")
    print(f"per training step: ours {ours_step * 1e3:.1f} ms, naive {naive_step * 1e3:.1f} ms")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
