"""Time one `llb-edge retrain` cycle on a pool of N line frames; prints a markdown table.

    .venv/bin/python bench/retrain_cycle.py                    # GPU target: 1000 frames, default settings
    .venv/bin/python bench/retrain_cycle.py --quick            # CPU smoke: 40 frames, tiny random encoder
    .venv/bin/python bench/retrain_cycle.py --frames 500 --set llb.k=3 --precisions fp32

The pool is built from real MTD images (normal tiles plus ``--defect-fraction`` defective ones, the
unlabelled contamination retraining is meant for) and written through the daemon's capture writer
(runtime/capture.py), so the PNG write rate is measured too. The "current" bundle has the same
architecture but is trained for one iteration only: the cycle's cost depends on its inference time,
not on its quality. The gate is wide open and nothing is promoted; the cycle's phases are read from
its decision.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llb_edge.config import load_config, write_config
from llb_edge.data.images import read_image_rgb
from llb_edge.exporters.bundle_export import export_bundle
from llb_edge.exporters.export_options import ExportOptions
from llb_edge.retrain import GateConfig, RetrainOptions, retrain
from llb_edge.runtime.capture import CaptureOptions, FrameCapture
from llb_edge.trainer.pipeline import run_training

REPO = Path(__file__).resolve().parents[1]
MTD = REPO.parent / "shared" / "data" / "mtd"

QUICK = [
    "data.resize=64", "data.crop=56", "model.encoder=test_tiny_patch14", "model.weights=random",
    "train.iterations=8", "train.batch_size=4", "train.warmup_iterations=3", "train.hm_ramp_iterations=6",
    "train.device=cpu", "llb.k=2", "llb.submodel_iterations=4", "eval.map_size=64",
]


def mtd_paths(frames: int, defect_fraction: float) -> list[Path]:
    normal = sorted((MTD / "MT_Free" / "Imgs").glob("*.jpg"))
    defects = sorted(p for d in sorted(MTD.glob("MT_*")) if d.name != "MT_Free" for p in (d / "Imgs").glob("*.jpg"))
    n_defect = round(frames * defect_fraction)
    # Repeats beyond the 952 normal tiles are fine for timing (each is a separate pool file).
    picked = [normal[i % len(normal)] for i in range(frames - n_defect)]
    picked += [defects[(i * 7) % len(defects)] for i in range(n_defect)]
    return picked


def build_pool(pool: Path, paths: list[Path]) -> float:
    """Write the frames through the capture writer; returns frames written per second."""
    cap = FrameCapture(CaptureOptions(pool_dir=pool, rate=1.0, queue_size=len(paths) + 1, queue_mb=1 << 20,
                                      quota_mb=1 << 20, seed=0)).start()
    images = [read_image_rgb(p) for p in paths]
    started = time.perf_counter()
    for frame_id, image in enumerate(images):
        cap.offer(image, camera_id="bench", frame_id=frame_id, capture_ts=None, score=0.0, decision="OK",
                  threshold=1.0, model_id="bench", model_version="current")
    cap.wait_idle(3600)
    seconds = time.perf_counter() - started
    cap.stop()
    return len(images) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=None, help="pool size (default 1000; --quick 40)")
    parser.add_argument("--defect-fraction", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="tiny random encoder on CPU: a smoke run")
    parser.add_argument("--config", "-c", default=None, help="training config (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override k=v")
    parser.add_argument("--precisions", default=None, help="comma-separated (default fp32,fp16; --quick fp32)")
    parser.add_argument("--backend", default=None, help="comparison backend (default ort-cuda on a GPU, else ort-cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch and ORT CPU threads")
    parser.add_argument("--out", default=None, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()

    frames = args.frames or (40 if args.quick else 1000)
    overrides = (QUICK if args.quick else []) + args.overrides
    precisions = tuple((args.precisions or ("fp32" if args.quick else "fp32,fp16")).split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available() and not args.quick
    backend = args.backend or ("ort-cuda" if gpu else "ort-cpu")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="retrain-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        pool_rate = build_pool(work / "pool", mtd_paths(frames, args.defect_fraction))

        # The current model: same recipe, one iteration, no screening (only its inference cost counts).
        base = load_config(args.config, [*overrides, "name=current", f"out_dir={work}", f"data.root={MTD}",
                                         "data.dataset=mtd", "data.max_train=64", "data.max_test=16",
                                         "train.iterations=1", "llb.stages=2"])
        current_run = run_training(base, evaluate_after=False)
        current = export_bundle(current_run, work / "current-bundle",
                                ExportOptions(precisions=precisions, model_version="current"))

        # Exactly this recipe: without a config, retrain would inherit the one-iteration current run's.
        cfg = load_config(args.config, overrides)
        write_config(cfg, work / "cycle-config.json")
        gate = GateConfig(max_ng_rate_change=1.0, max_disagreement=1.0, max_labeled_drop=1.0, min_holdout=0)
        started = time.perf_counter()
        decision = retrain(work / "pool", current.root, work / "cycles", RetrainOptions(
            config=work / "cycle-config.json", gate=gate, promote_if_passed=False, precisions=precisions,
            backend=backend, threads=args.threads))
        wall = time.perf_counter() - started
        comp = json.loads((decision.report_dir / "comparison.json").read_text())
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)

    t = decision.timing
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()})"
    scored = 2 * (comp["holdout"]["frames"] + sum(comp["labeled_counts"].values()))
    print(f"retrain cycle: {frames} pool frames ({args.defect_fraction:.0%} defective), {device}; "
          f"{cfg.model.encoder} {cfg.data.resize}->{cfg.data.crop}, stages {cfg.llb.stages}, k={cfg.llb.k}, "
          f"sub-model iterations {cfg.llb.submodel_iterations}, iterations {cfg.train.iterations}, "
          f"batch {cfg.train.batch_size}, precisions {','.join(precisions)}, comparison on {backend}\n")
    rows = [
        ("capture: PNG writes (frames/s, not in the cycle)", f"{pool_rate:.0f}"),
        ("snapshot + split", f"{t.get('snapshot_s', 0):.1f}"),
        (f"training: stage 1 + 2 ({comp['pool']['train']} frames, {comp['pool']['kept_by_llb']} kept)",
         f"{t.get('train_s', 0):.1f}"),
        ("  of which feature encoding", f"{t.get('encode_s', 0):.1f}"),
        ("export + parity gate", f"{t.get('export_s', 0):.1f}"),
        (f"comparison ({scored} ORT inferences)", f"{t.get('compare_s', 0):.1f}"),
        ("report", f"{t.get('report_s', 0):.1f}"),
        ("**one retrain cycle**", f"**{wall:.1f}**"),
    ]
    print("| phase | seconds |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
