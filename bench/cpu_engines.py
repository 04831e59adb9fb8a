"""CPU engines compared: ONNX Runtime fp32 vs OpenVINO f32 / bf16 / INT8 (and ONNX Runtime fp16), gated.

    .venv/bin/python bench/cpu_engines.py [--bundle DIR | --encoder vit_small_patch14_dinov2 --size 392
        --weights auto] [--threads N] [--repeats 8] [--gate-images 96] [--calibration-images 64]
        [--serve-duration 30] [--json PATH] [--quick]

One run, on this machine:

1. The model. ``--bundle``: a real exported bundle (its fp32/fp16 ONNX, threshold, stored gate and
   calibration images; copied, never modified). Default: DINOv2 ViT-S/14 with the real weights and
   a random decoder at ``--size`` (the product's default input, 392 px), built by
   bench/serve_throughput.py's bundle builder, with real MTD images as gate images (defects and
   defect-free) and calibration images (other defect-free images); its threshold is the median
   fp32 score of the gate images, so half of them sit on each side: the hardest case for OK/NG
   agreement.
2. The OpenVINO variants are built and gated exactly as `llb-edge bundle build-engine --engine
   openvino` does (exporters/openvino.py); ONNX Runtime fp16 on CPU faces the same decision gate.
3. Latency of every engine at batch 1 and at the daemon's default max batch, interleaved
   (round-robin, median of ``--repeats``) so load drift on a shared machine hits all alike.
   A rejected variant is timed too (it is kept for the bench only) and marked rejected.
4. `llb-edge serve` end to end with each servable engine: bench/serve_throughput.py --fps 0
   (sustained, producer in another process, 1024 px raw frames) on a bundle that holds only that
   engine, frames/s and latency. ONNX Runtime fp16 is not served on CPU (ort-cpu loads fp32).

``--quick``: a tiny random encoder at 56 px, a few images, 2 repeats, 2 s per daemon: checks the
bench end to end in about a minute; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from export_latency import interleaved_ms
from serve_throughput import build_bundle, resolve_weights

from llb_edge.bundle import MANIFEST_NAME, Bundle, load_bundle, set_threshold, write_manifest
from llb_edge.data.images import read_image_rgb
from llb_edge.data.transforms import Geometry
from llb_edge.exporters import openvino as ov_export
from llb_edge.exporters import parity
from llb_edge.exporters.bundle_export import store_image_set
from llb_edge.runtime import openvino_backend as ov_backend
from llb_edge.runtime.backends import OnnxRuntimeBackend
from llb_edge.runtime.daemon import ServeOptions

REPO = Path(__file__).resolve().parents[1]
MTD = REPO.parent / "shared" / "data" / "mtd"
OUT = REPO / "bench_out" / "cpu_engines"
DEFECT_CLASSES = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
DAEMON_BATCH = next(f.default for f in dataclasses.fields(ServeOptions) if f.name == "max_batch")


def mtd_images(gate_count: int, calibration_count: int) -> tuple[list[str], list[str]]:
    """(gate paths, calibration paths): gate half defects (all classes), half defect-free; calibration other free."""
    free = sorted((MTD / "MT_Free" / "Imgs").glob("*.jpg"))
    defects = [sorted((MTD / name / "Imgs").glob("*.jpg")) for name in DEFECT_CLASSES]
    want_defects = gate_count // 2
    gate = [str(paths[i]) for i in range(max(len(p) for p in defects)) for paths in defects if i < len(paths)]
    gate = gate[:want_defects] + [str(p) for p in free[: gate_count - want_defects]]
    calibration = [str(p) for p in free[gate_count - want_defects :][:calibration_count]]
    return gate, calibration


def built_bundle(args: argparse.Namespace, work: Path) -> Path:
    """The run-less model's bundle with real gate/calibration images and a median-score threshold.

    Reused from an earlier run of the same settings unless ``--rebuild`` (the export takes minutes).
    """
    root = work / "bundle"
    if not args.rebuild:
        with contextlib.suppress(Exception):  # missing or broken: build it
            extra = load_bundle(root).manifest.extra
            if extra[parity.GATE_IMAGES[0]]["count"] == args.gate_images and \
                    extra[parity.CALIBRATION_IMAGES[0]]["count"] == args.calibration_images:
                return root
    weights = resolve_weights(args.encoder, args.weights)
    precisions = ["fp32"] if args.quick else ["fp32", "fp16"]
    root = build_bundle(args.encoder, args.size, weights, precisions, root)
    bundle = load_bundle(root)
    geometry = Geometry(bundle.manifest.preprocessing.resize, bundle.manifest.preprocessing.crop)
    gate_paths, calibration_paths = mtd_images(args.gate_images, args.calibration_images)
    for image_set, paths in ((parity.GATE_IMAGES, gate_paths), (parity.CALIBRATION_IMAGES, calibration_paths)):
        images = np.stack([geometry.to_model_input(read_image_rgb(p)) for p in paths])
        bundle.manifest.extra[image_set[0]] = store_image_set(root, image_set, images, paths)
    write_manifest(root, bundle.manifest)
    gate = parity.bundle_images(load_bundle(root), parity.GATE_IMAGES)
    scores = parity.run_onnxruntime(root / "model_fp32.onnx", gate, DAEMON_BATCH, args.threads)[1]
    set_threshold(root, float(np.median(scores)), set_by="bench/cpu_engines.py",
                  reason="bench: median fp32 score of the gate images (half OK, half NG)")
    return root


def onnx_path(bundle: Bundle, precision: str) -> Path | None:
    return next((bundle.root / s.path for s in bundle.manifest.files.values()
                 if s.format == "onnx" and s.precision == precision), None)


def single_engine_view(bundle: Bundle, keep: str | None, target: Path) -> Path:
    """A bundle folder serving one engine: the fp32 ONNX plus (optionally) one OpenVINO entry; files hard-linked."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    manifest = dataclasses.replace(bundle.manifest, files={
        name: spec for name, spec in bundle.manifest.files.items()
        if (spec.format == "onnx" and spec.precision == "fp32") or name == keep})
    for path in {spec.path for spec in manifest.files.values()}:  # fp32 and bf16 variants share the fp32 graph
        # Hard links: the loader refuses symlinks that lead out of a bundle folder.
        os.link(bundle.root / path, target / path)
    write_manifest(target, manifest)
    return target


def serve_fps(view: Path, backend: str, args: argparse.Namespace, json_path: Path) -> dict[str, Any]:
    """bench/serve_throughput.py --fps 0 against ``view``; its sustained phase."""
    command = [sys.executable, str(REPO / "bench" / "serve_throughput.py"), "--bundle", str(view), "--backend",
               backend, "--fps", "0", "--duration", str(args.serve_duration), "--max-batch", str(DAEMON_BATCH),
               "--frame-size", str(args.frame_size), "--json", str(json_path)]
    if args.threads is not None:
        command += ["--ort-threads", str(args.threads)]
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(json_path.read_text())["phases"][0]


def gate_text(report: dict[str, Any] | None) -> str:
    if not report:
        return "reference"
    verdict = "accepted" if report["passed"] else "REJECTED: " + "; ".join(report["failures"])
    return (f"map {report['map_max_abs']:.2g}, score {report['score_max_abs']:.2g}, rho {report['spearman']:.5f}, "
            f"OK/NG {report['agreement']:.2%} ({report['disagreements']}/{report['images']} flipped, "
            f"{report['reference_ng']} NG) - {verdict}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="A real exported bundle (copied; default: build one).")
    parser.add_argument("--encoder", default="vit_small_patch14_dinov2")
    parser.add_argument("--size", type=int, default=392, help="Model input size (the product's default: 392).")
    parser.add_argument("--weights", default="auto", help="auto (shared DINOv2 file, else random) | random | path.")
    parser.add_argument("--threads", type=int, help="Inference threads of every engine (default: all cores).")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--gate-images", type=int, default=ov_export.DEFAULT_GATE_IMAGES)
    parser.add_argument("--calibration-images", type=int, default=ov_export.DEFAULT_CALIBRATION_IMAGES)
    parser.add_argument("--serve-duration", type=float, default=30.0, help="Seconds per daemon run (0: skip).")
    parser.add_argument("--frame-size", type=int, default=1024, help="Raw camera frames sent to the daemon.")
    parser.add_argument("--rebuild", action="store_true", help="Rebuild the bench's own bundle.")
    parser.add_argument("--json", type=Path, help="Also write everything as JSON here.")
    parser.add_argument("--quick", action="store_true", help="Tiny random model, few images: checks the bench.")
    args = parser.parse_args()
    if args.quick:
        args.encoder, args.size, args.weights = "test_tiny_patch14", 56, "random"
        args.repeats, args.gate_images, args.calibration_images = 2, 8, 8
        args.serve_duration, args.frame_size = min(args.serve_duration, 2.0), 256
    return args


def main() -> None:
    args = parse_args()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    work = OUT / ("quick" if args.quick else (args.bundle.name if args.bundle else f"{args.encoder}-{args.size}"))
    work.mkdir(parents=True, exist_ok=True)
    if args.bundle:
        shutil.rmtree(work / "bundle", ignore_errors=True)
        root = Path(shutil.copytree(args.bundle, work / "bundle"))
    else:
        root = built_bundle(args, work)
    load_before = os.getloadavg()[0]

    # 1. Build and gate: what `bundle build-engine --engine openvino` does.
    bundle = load_bundle(root)
    fp32 = onnx_path(bundle, "fp32")
    gate = parity.bundle_images(bundle, parity.GATE_IMAGES)
    calibration = parity.bundle_images(bundle, parity.CALIBRATION_IMAGES)
    reference = parity.run_onnxruntime(fp32, gate, DAEMON_BATCH, args.threads)
    builds = {precision: ov_export.build_variant(fp32, precision, gate, bundle.threshold, calibration, reference,
                                                 work / "cache", args.threads, keep_rejected=True)
              for precision in ov_backend.PRECISIONS}
    bundle = ov_export.record_variants(bundle, list(builds.values()))
    reports: dict[str, dict[str, Any] | None] = {"ort-fp32": None}
    reports |= {f"openvino-{p}": b.report.to_dict() for p, b in builds.items()}
    fp16 = onnx_path(bundle, "fp16")
    if fp16 is not None:
        candidate = parity.run_onnxruntime(fp16, gate, DAEMON_BATCH, args.threads)
        reports["ort-fp16"] = parity.check_decisions(reference, candidate, bundle.threshold, "fp16",
                                                     "onnxruntime-cpu-fp16").to_dict()

    # 2. Interleaved latency, batch 1 and the daemon's batch.
    engines: dict[str, Any] = {"ort-fp32": OnnxRuntimeBackend(fp32, max_batch=DAEMON_BATCH,
                                                              intra_op_threads=args.threads)}
    if fp16 is not None:
        engines["ort-fp16"] = OnnxRuntimeBackend(fp16, max_batch=DAEMON_BATCH, intra_op_threads=args.threads)
    for precision, build in builds.items():
        engines[f"openvino-{precision}"] = ov_backend.OpenVinoBackend(build.path, precision=precision,
                                                                      max_batch=DAEMON_BATCH, threads=args.threads)
    batches = {b: np.ascontiguousarray(np.resize(gate, (b, *gate.shape[1:]))) for b in (1, DAEMON_BATCH)}
    runs = {(name, b): (lambda engine=engine, x=x: engine.run(x)) for name, engine in engines.items()
            for b, x in batches.items()}
    timings = interleaved_ms(runs, args.repeats)
    for engine in engines.values():
        engine.close()
    for build in builds.values():  # kept for timing only: a rejected blob must not stay in a cache
        if not build.report.passed and build.precision == "int8":
            build.path.unlink(missing_ok=True)
    load_mid = os.getloadavg()[0]

    # 3. The daemon end to end, one engine per bundle view.
    served: dict[str, dict[str, Any]] = {}
    if args.serve_duration > 0:
        names = {spec.precision: name for name, spec in bundle.manifest.files.items()
                 if spec.format == ov_backend.FORMAT and spec.target.get("cpu_key") == builds["fp32"].cpu.key()}
        plan = [("ort-fp32", "ort-cpu", None)] + [(f"openvino-{p}", "openvino", n) for p, n in names.items()]
        for label, backend, keep in plan:
            view = single_engine_view(bundle, keep, work / "views" / label)
            served[label] = serve_fps(view, backend, args, work / f"serve-{label}.json")
    load_after = os.getloadavg()[0]

    cpu = builds["fp32"].cpu
    import onnxruntime

    print(f"\nCPU engines, {started_at}: {cpu.model}, flags {' '.join(cpu.flags)}; {os.cpu_count()} CPUs, "
          f"threads {args.threads or 'all'}; OpenVINO {builds['fp32'].openvino}, onnxruntime "
          f"{onnxruntime.__version__}; load average {load_before:.1f} -> {load_mid:.1f} -> {load_after:.1f}.")
    print(f"Model {bundle.manifest.model_id} ({bundle.manifest.encoder}, {bundle.manifest.preprocessing.crop} px, "
          f"map {bundle.manifest.map_size}), threshold {bundle.threshold:.6g} ({bundle.manifest.threshold.method}); "
          f"gate on {len(gate)} real images, INT8 calibrated on {len(calibration)}; median of {args.repeats} "
          f"interleaved runs.\n")
    print("| engine | batch | ms/batch | ms/image | vs ORT fp32 | decision gate vs ORT fp32 |")
    print("|---|---|---|---|---|---|")
    for (name, batch), ms in timings.items():
        speedup = timings[("ort-fp32", batch)] / ms
        print(f"| {name} | {batch} | {ms:.1f} | {ms / batch:.1f} | {speedup:.2f}x | {gate_text(reports.get(name))} |")
    if served:
        print("\n| engine (daemon backend) | frames/s | vs ORT fp32 | p50 ms | p99 ms | mean batch |")
        print("|---|---|---|---|---|---|")
        for label, phase in served.items():
            speedup = phase["achieved_fps"] / max(1e-9, served["ort-fp32"]["achieved_fps"])
            print(f"| {label} ({phase['backend']}) | {phase['achieved_fps']:.2f} | {speedup:.2f}x | "
                  f"{phase['latency_ms'].get('p50', 0):.0f} | {phase['latency_ms'].get('p99', 0):.0f} | "
                  f"{phase['batches']['mean']:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"started": started_at, "cpu": cpu.describe(), "openvino": builds["fp32"].openvino,
                   "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "latency_ms": [{"engine": n, "batch": b, "ms": ms} for (n, b), ms in timings.items()],
                   "gate": reports, "served": served, "load": [load_before, load_mid, load_after]}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\n(bundle with the accepted variants: {root}; its {MANIFEST_NAME} holds the gate figures)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
