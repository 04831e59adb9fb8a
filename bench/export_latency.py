"""Export time and ONNX Runtime CPU latency of Dinomaly ViT-S/14 at the default input size.

    .venv/bin/python bench/export_latency.py [--size 392] [--weights PATH] [--batches 1 4] [--repeats 5]

Builds the run-less model (real DINOv2 ViT-S/14 weights, randomly initialised decoder: latency and
graph do not depend on trained decoder weights), exports fp32 and fp16 ONNX with the exporter the
bundles use, lints both, checks parity on real MTD images, then times ONNX Runtime on CPU (and
eager PyTorch fp32 for comparison). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from llb_edge.data.images import read_image_rgb
from llb_edge.data.transforms import Geometry
from llb_edge.exporters import parity
from llb_edge.exporters.lint import lint_model
from llb_edge.exporters.onnx_export import export_onnx
from llb_edge.models.dinomaly import AnomalyScorer, InspectionModel, create_dinomaly

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def real_images(size: int, count: int) -> np.ndarray:
    mtd = SHARED / "data" / "mtd"
    paths = sorted((mtd / "MT_Blowhole" / "Imgs").glob("*.jpg"))[: count // 2]
    paths += sorted((mtd / "MT_Free" / "Imgs").glob("*.jpg"))[: count - len(paths)]
    geometry = Geometry(round(size * 8 / 7), size)  # the default 448 -> 392 ratio
    return np.stack([geometry.to_model_input(read_image_rgb(p)) for p in paths])


def interleaved_ms(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time per run, in ms, measured round-robin.

    The machine is shared: load drifts over minutes. Timing every configuration once per round
    spreads that drift over all of them instead of penalising whichever ran during a busy spell.
    """
    for run in runs.values():
        run()  # warm-up: allocations, ORT's first-run graph work
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1000.0 for name, values in samples.items()}


@torch.no_grad()
def torch_forward(model: torch.nn.Module, x: torch.Tensor) -> object:
    return model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=392)
    parser.add_argument("--weights", default=str(SHARED / "weights" / "dinov2_vits14.safetensors"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parity-images", type=int, default=6)
    args = parser.parse_args()

    torch.manual_seed(0)
    dinomaly, _ = create_dinomaly("vit_small_patch14_dinov2", args.size, args.weights)
    model = InspectionModel(dinomaly, AnomalyScorer(args.size)).eval()
    images = real_images(args.size, args.parity_images)
    reference = parity.run_torch(model, images, batch_size=2)
    threads = torch.get_num_threads()
    batches = {b: np.ascontiguousarray(np.resize(images, (b, *images.shape[1:]))) for b in args.batches}
    runs: dict[str, Callable[[], object]] = {}
    info: dict[str, tuple[str, int, float | None, float | None, int | None, parity.ParityReport | None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "fp16"):
            result = export_onnx(model, Path(tmp) / f"vits14_{precision}.onnx", precision)
            findings = lint_model(result.path)
            report = parity.check_onnx_parity(model, result.path, images, precision, reference, batch_size=2)
            size_mb = os.path.getsize(result.path) / 2**20
            session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
            for batch, x in batches.items():
                key = f"ort-{precision}-b{batch}"
                runs[key] = partial(session.run, None, {"images": x})
                info[key] = (f"ONNX Runtime CPU {precision}", batch, result.seconds, size_mb, len(findings), report)
        for batch, x in batches.items():
            key = f"torch-b{batch}"
            tensor = torch.from_numpy(x)
            runs[key] = partial(torch_forward, model, tensor)
            info[key] = ("PyTorch eager CPU fp32", batch, None, None, None, None)
        load_before = os.getloadavg()[0]
        timings = interleaved_ms(runs, args.repeats)
        load_after = os.getloadavg()[0]
    rows = [(*info[key][:2], timings[key], *info[key][2:]) for key in runs]

    print(f"\nDinomaly ViT-S/14, {args.size} px, map 256, CPU threads {threads} ({os.cpu_count()} cores), "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}, median of {args.repeats} interleaved runs, "
          f"load average {load_before:.1f} -> {load_after:.1f}\n")
    print("| backend | batch | latency ms | ms/image | export s | file MB | lint findings | parity vs PyTorch fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batch, ms, export_s, size_mb, lint_n, report in rows:
        parity_text = (f"map {report.map_max_abs:.2g}, score {report.score_max_abs:.2g}, rho {report.spearman:.4f}"
                       if report else "reference")
        print(f"| {name} | {batch} | {ms:.0f} | {ms / batch:.0f} | "
              f"{'' if export_s is None else f'{export_s:.1f}'} | {'' if size_mb is None else f'{size_mb:.0f}'} | "
              f"{'' if lint_n is None else lint_n} | {parity_text} |")


if __name__ == "__main__":
    main()
