"""Every GPU figure of issue 14 in one call of at most 8 minutes: one JSON, one Markdown table.

    python bench/gpu_suite.py [--out bench_out/gpu_suite] [--wheels bench_out/wheels] [--data DIR]
                              [--weights PATH] [--parts training,inference,serving,parity,metric,compile]
                              [--budget-s 450]
    python bench/gpu_suite.py --quick   # CPU, tiny encoder, ~10 s of CPU: proves the script runs
    python bench/gpu_suite.py --prepare-carry   # here, before a device run: a small MTD copy to carry

Parts (each reuses the benchmark that owns the measurement):

- training (bench/stage1_speed.py): Dinomaly step time, ours (fp16 feature cache, bf16 autocast)
  against naive (encoder every step, fp32), ViT-B/14 and ViT-S/14 (random weights) at 392 px,
  batch 16: images/s and the ratio; for ViT-B the stage-1 pipeline (k = 5 x 1000 iterations +
  scoring 5 x 1000 images + 5000 final iterations) extrapolated from timed steps, with the
  sub-models one after another and on CUDA streams;
- inference (runtime/torch_backend.py, the serving code itself): images/s and latency at batch 1
  and 32 (uint8 frames in, maps and scores back on the host), eager fp32, eager bf16, bf16 with
  CUDA graphs; the same with torch.compile as the last part (compiling ViT-B takes minutes: the
  budget skips it first);
- serving (bench/serve_throughput.py): `llb-edge serve --backend torch-cuda`, 1024x1024 RGB raw
  frames over loopback from another process, 8 cameras, max batch 32: sustained frames/s, then
  p50/p99 at 200 frames/s;
- parity: the torch backend on CUDA in bf16 against the fp32 model on the CPU, on real MTD images
  (map and score error, Spearman; exporters/parity.py);
- metric: the same short MTD training in fp32 and in bf16 (trainer pipeline), image AUROC/AP and
  pixel metrics of each and the difference.

Each part is timed (wall and CPU seconds; the call's totals too, with the one-time build of the
serving bundle, cached for later calls, recorded apart); a part that would end after ``--budget-s``
by its estimate is skipped and says so, so the call ends within the device's time. Results:
``OUT/gpu_suite.json`` and ``OUT/gpu_suite.md`` (the table, also printed).

A device may lack Python packages the suite needs (pyzmq for serving, always, on the project's GPU
machine). Before importing anything else the suite checks them; missing ones are installed with
``pip install --no-index --find-links WHEELS`` from ``--wheels`` (wheels fetched here with
``pip download``, carried with the run; docs/PERF.md has the exact commands), and llb-edge itself
is installed from this checkout when it does not import. Serving is skipped, with the command that
fixes it, when pyzmq still does not import; any other missing package stops the suite with it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BENCH_OUT = REPO / "bench_out"
CARRY_DATA = BENCH_OUT / "gpu_carry" / "mtd"  # --prepare-carry writes it; carried to the device
# In run order, most wanted first: compile (minutes of inductor work for ViT-B) comes last, so the
# budget skips it rather than a figure the targets need.
PARTS = ("training", "inference", "serving", "parity", "metric", "compile")
# import name -> the distribution pip installs it from
NEEDED = {
    "cv2": "opencv-python-headless",
    "typer": "typer",
    "tqdm": "tqdm",
    "safetensors": "safetensors",
    "timm": "timm",
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "onnxruntime": "onnxruntime",
}
SERVING_NEEDS = {"zmq": "pyzmq"}
WHEEL_DOWNLOAD = ("pip download {dists} setuptools --only-binary=:all: --python-version {py} "
                  "--platform manylinux2014_x86_64 -d bench_out/wheels/")
CARRY_NORMALS = 200  # MT_Free images copied by --prepare-carry (the metric part trains on up to 160)
CARRY_DEFECTS = 16  # per defect class, with their masks
# The targets (ViT-B/14, 392 px, one H100/H200), printed beside the figures.
TARGETS = {
    "training_ratio": ">= 3x naive images/s",
    "inference_b32": ">= 1700 images/s",
    "inference_b1": "<= 2 ms",
    "serving_fps": ">= 1000 frames/s",
    "serving_p99": "<= 20 ms at 200 frames/s",
}


@dataclass(frozen=True)
class Settings:
    """What each part runs: the device settings, or tiny CPU ones with --quick."""

    device: str
    train_encoders: tuple[str, ...]
    pipeline_encoder: str  # the encoder whose whole stage-1 pipeline is extrapolated
    size: int
    stage1_args: tuple[str, ...]  # bench/stage1_speed.py options for the pipeline encoder
    step_args: tuple[str, ...]  # ... and for the others (step time only: small N, k = 1)
    infer_encoder: str
    infer_batches: tuple[int, ...]
    infer_modes: tuple[tuple[str, str], ...]  # (mode, precision) of the inference part
    compile_modes: tuple[tuple[str, str], ...]  # ... and of the compile part (same measurement)
    infer_runs: int  # timed runs at batch 1; a quarter of it (at least 3) at larger batches
    serve_args: tuple[str, ...]  # bench/serve_throughput.py options
    parity_images: int
    metric_overrides: tuple[str, ...]  # trainer config overrides of the fp32/bf16 runs
    part_estimates_s: dict[str, float]  # a part is skipped when it would end after the budget
    # torch intra-op threads of the suite and of serving's daemon (OMP_NUM_THREADS); None: torch's default
    cpu_threads: int | None = None


def full_settings() -> Settings:
    stage1 = ("--n", "1000", "--k", "5", "--sub-its", "1000", "--final-its", "5000", "--batch", "16",
              "--timed-its", "40", "--naive-timed-its", "15", "--warmup-its", "5", "--score-images", "256",
              "--concurrent", "0")
    steps = ("--n", "128", "--k", "1", "--sub-its", "1000", "--final-its", "5000", "--batch", "16",
             "--timed-its", "40", "--naive-timed-its", "15", "--warmup-its", "5", "--score-images", "32")
    serve = ("--encoder", "vit_base_patch14_dinov2", "--size", "392", "--weights", "random",
             "--backend", "torch-cuda", "--ok-frames", "--cameras", "8", "--max-batch", "32", "--queue-size", "8",
             "--post-workers", "4", "--fps", "0", "200", "--duration", "15", "--warmup", "8")
    metric = ("data.max_train=160", "data.max_test=120", "data.resize=256", "data.crop=224",
              "model.encoder=vit_small_patch14_dinov2", "train.iterations=300", "train.batch_size=16",
              "train.warmup_iterations=30", "train.hm_ramp_iterations=150", "llb.stages=2", "eval.overlays=0")
    return Settings(
        device="cuda", train_encoders=("vit_base_patch14_dinov2", "vit_small_patch14_dinov2"),
        pipeline_encoder="vit_base_patch14_dinov2", size=392, stage1_args=stage1, step_args=steps,
        infer_encoder="vit_base_patch14_dinov2", infer_batches=(1, 32),
        infer_modes=(("eager", "fp32"), ("eager", "bf16"), ("graphs", "bf16")), compile_modes=(("compile", "bf16"),),
        infer_runs=100, serve_args=serve, parity_images=16, metric_overrides=metric,
        # Guesses for an H100/H200 (not measured yet): serving exports ViT-B to ONNX on the CPU first.
        part_estimates_s={"training": 60, "inference": 40, "serving": 180, "parity": 20, "metric": 90,
                          "compile": 150},
    )


def quick_settings() -> Settings:
    tiny = ("--n", "16", "--k", "2", "--sub-its", "20", "--final-its", "40", "--batch", "4", "--timed-its", "2",
            "--naive-timed-its", "2", "--warmup-its", "1", "--score-images", "4")
    # One second of sustained serving is some hundred frames: every stage of the daemon runs. Most of
    # the part is the daemon's start-up (importing torch and timm, the parity gate), not the phase.
    serve = ("--encoder", "test_tiny_patch14", "--size", "56", "--weights", "random", "--backend", "torch-cpu",
             "--ok-frames", "--frame-size", "256", "--fps", "0", "--duration", "1", "--warmup", "1",
             "--ort-threads", "1")
    metric = ("data.max_train=12", "data.max_test=8", "data.resize=64", "data.crop=56",
              "model.encoder=test_tiny_patch14", "model.weights=random", "train.iterations=3", "train.batch_size=4",
              "train.warmup_iterations=1", "train.hm_ramp_iterations=2", "llb.stages=2", "eval.overlays=0",
              "eval.map_size=64")
    return Settings(
        device="cpu", train_encoders=("test_tiny_patch14",), pipeline_encoder="test_tiny_patch14", size=56,
        stage1_args=tiny, step_args=tiny, infer_encoder="test_tiny_patch14", infer_batches=(1, 4),
        infer_modes=(("eager", "fp32"),), compile_modes=(), infer_runs=3, serve_args=serve, parity_images=4,
        metric_overrides=metric, part_estimates_s={},
        # Tiny models: a second thread only contends (and spins, costing CPU time on a loaded machine).
        cpu_threads=1,
    )


# --------------------------------------------------------------------------------------- packages


def _missing(modules: dict[str, str]) -> dict[str, str]:
    importlib.invalidate_caches()
    return {name: dist for name, dist in modules.items() if importlib.util.find_spec(name) is None}


def _pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--no-index", *args]
    print("+ " + " ".join(command), file=sys.stderr)
    subprocess.run(command, check=False)


def wheel_command(dists: list[str]) -> str:
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return WHEEL_DOWNLOAD.format(dists=" ".join(dists), py=py)


def prepare_packages(wheels: Path | None) -> str | None:
    """Install what is missing from ``wheels``; returns why serving cannot run, or None. Exits when more is missing."""
    missing = _missing({**NEEDED, **SERVING_NEEDS})
    if missing and wheels is not None and wheels.is_dir():
        _pip("--find-links", str(wheels), *sorted(set(missing.values())))
        missing = _missing(missing)
    if importlib.util.find_spec("llb_edge") is None:
        # A fresh device: install this checkout without its dependencies (nothing can be fetched
        # there). The build backend (setuptools) comes from the wheels when they are given.
        have_wheels = wheels is not None and wheels.is_dir()
        _pip("--no-deps", *(["--find-links", str(wheels)] if have_wheels else ["--no-build-isolation"]), str(REPO))
        if _missing({"llb_edge": "llb-edge"}):
            sys.exit("llb-edge does not import and could not be installed from this checkout")
    fatal = {name: dist for name, dist in missing.items() if name not in SERVING_NEEDS}
    if fatal:
        sys.exit(f"missing Python packages: {', '.join(sorted(fatal.values()))}. Fetch wheels here with\n  "
                 f"{wheel_command(sorted(fatal.values()))}\nand pass --wheels bench_out/wheels (carry it).")
    if missing:
        return (f"pyzmq is not installed: fetch it with `{wheel_command(['pyzmq'])}` and run with "
                "--wheels bench_out/wheels, carrying bench_out/wheels (docs/PERF.md)")
    return None


def prepare_carry(source: Path, target: Path) -> None:
    """A small MTD copy (same layout) for the device: the first images of each class, with masks."""
    if target.exists():
        shutil.rmtree(target)
    for folder in sorted(source.glob("MT_*")):
        images = sorted((folder / "Imgs").glob("*.jpg"))[: CARRY_NORMALS if folder.name == "MT_Free" else CARRY_DEFECTS]
        (target / folder.name / "Imgs").mkdir(parents=True)
        for image in images:
            for path in (image, image.with_suffix(".png")):
                if path.is_file():
                    shutil.copyfile(path, target / folder.name / "Imgs" / path.name)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"wrote {target} ({size / 1e6:.1f} MB): carry bench_out/gpu_carry to the device")


# ------------------------------------------------------------------------------------------ parts


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (serving's subprocesses).

    The suite's cost independent of how many cores other programs leave it, unlike its wall time.
    """
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def one_time_costs(parts: dict[str, Any]) -> dict[str, dict[str, float]]:
    """What this call spent filling caches that later calls reuse: the serving bundle (an ONNX export)."""
    build = parts.get("serving", {}).get("bundle_build")
    return {"serving bundle": build} if build else {}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_training(s: Settings) -> dict[str, Any]:
    import stage1_speed

    records = {}
    for encoder in s.train_encoders:
        options = s.stage1_args if encoder == s.pipeline_encoder else s.step_args
        args = stage1_speed.parse_args(["--encoder", encoder, "--size", str(s.size), "--device", s.device, *options])
        record = stage1_speed.measure(args)
        steps, batch = record["step_s"], args.batch
        record["images_per_s"] = {"ours": batch / steps["ours"], "naive": batch / steps["naive"]}
        record["ratio"] = steps["naive"] / steps["ours"]
        if encoder == s.pipeline_encoder:
            by_stage = {row["stage"].split(" (")[0]: row for row in record["rows"]}
            serial_stage1 = steps["ours"] * args.k * args.sub_its
            streams_total = record["total_ours_s"]
            record["pipeline_s"] = {
                "ours_serial": streams_total - by_stage["stage 1 training"]["ours_s"] + serial_stage1,
                "ours_streams": streams_total,
                "naive": record["total_naive_s"],
                "streams": record["concurrent"],
            }
        records[encoder] = record
    return {"encoders": records}


def _timed_runs(run: Callable[[], Any], runs: int, device: Any) -> list[float]:
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _bench_model(encoder: str, size: int) -> Any:
    """The InspectionModel with a random encoder and decoder: timing and precision effects only."""
    import torch

    from llb_edge.models.dinomaly import AnomalyScorer, InspectionModel, create_dinomaly

    torch.manual_seed(0)
    dinomaly, _ = create_dinomaly(encoder, size, "random")
    return InspectionModel(dinomaly, AnomalyScorer(size)).eval()


def part_inference(s: Settings, modes: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    import numpy as np

    from llb_edge.runtime.torch_backend import TorchBackend

    model = _bench_model(s.infer_encoder, s.size)
    rng = np.random.default_rng(0)
    batches = {b: rng.integers(0, 256, (b, s.size, s.size, 3), dtype=np.uint8) for b in s.infer_batches}
    rows = []
    for mode, precision in modes:
        started = time.perf_counter()
        backend = TorchBackend(model, device=s.device, precision=precision, max_batch=max(s.infer_batches), mode=mode)
        for batch in batches.values():  # warm-up; compiles each shape in compile mode
            backend.run(batch)
        setup_s = time.perf_counter() - started
        for size, batch in batches.items():
            runs = max(3, s.infer_runs // 4) if size > 1 else s.infer_runs
            times = np.asarray(_timed_runs(lambda b=batch, run=backend.run: run(b), runs, backend.device))
            rows.append({"mode": mode, "precision": precision, "batch": size, "runs": runs,
                         "latency_ms_p50": float(np.median(times) * 1e3),
                         "latency_ms_p99": float(np.percentile(times, 99) * 1e3),
                         "images_per_s": float(size * runs / times.sum()), "setup_s": setup_s})
        backend.close()  # frees its graphs and cached blocks before the next mode captures its own
    return {"encoder": s.infer_encoder, "size": s.size, "rows": rows}


def part_serving(s: Settings, out: Path, unavailable: str | None) -> dict[str, Any]:
    if unavailable:
        return {"skipped": unavailable}
    target = out / "serve.json"
    command = [sys.executable, str(REPO / "bench" / "serve_throughput.py"), *s.serve_args, "--json", str(target)]
    print("+ " + " ".join(command), file=sys.stderr)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(s.cpu_threads)} if s.cpu_threads else {}))
    completed = subprocess.run(command, cwd=REPO, env=env, check=False)
    if completed.returncode != 0 or not target.is_file():
        return {"failed": f"serve_throughput.py exited {completed.returncode}", "command": command}
    record = json.loads(target.read_text())
    return {"command": command, "phases": record["phases"], "daemon_stopped": record.get("daemon_stopped"),
            "bundle_build": record.get("bundle_build")}


def real_images(data: Path, count: int, size: int) -> tuple[Any, list[int]]:
    """(uint8 [N, size, size, 3], labels): an even normal/defect spread of the MTD test split."""
    from llb_edge.config import DataConfig
    from llb_edge.data.readers import load_dataset
    from llb_edge.data.transforms import Geometry
    from llb_edge.exporters.parity import spread_indices
    from llb_edge.trainer.features import load_model_inputs

    test = load_dataset(DataConfig(dataset="mtd", root=str(data), resize=round(size * 8 / 7), crop=size)).test
    chosen = [test[i] for i in spread_indices([sample.label for sample in test], count)]
    return load_model_inputs(chosen, Geometry(round(size * 8 / 7), size)), [sample.label for sample in chosen]


def part_parity(s: Settings, data: Path) -> dict[str, Any]:
    from llb_edge.exporters import parity
    from llb_edge.runtime.torch_backend import TorchBackend

    images, labels = real_images(data, s.parity_images, s.size)
    model = _bench_model(s.infer_encoder, s.size)  # the inference rows' model (random encoder weights)
    reference = parity.run_torch(model, images)  # fp32 on the CPU
    precision = "bf16" if s.device == "cuda" else "fp32"
    backend = TorchBackend(model, device=s.device, precision=precision, mode="graphs")
    report = parity.compare_outputs(reference, backend.run(images), parity.tolerance_for(
        "fp32" if precision == "fp32" else "fp16"), "torch-cpu-fp32", f"torch-{s.device}-{precision}")
    backend.close()
    return {"encoder": s.infer_encoder, "images": len(images), "defects": int(sum(labels)), **report.to_dict()}


def part_metric(s: Settings, out: Path, data: Path, weights: str) -> dict[str, Any]:
    import torch

    from llb_edge.config import load_config
    from llb_edge.runs import METRICS, read_json
    from llb_edge.trainer.pipeline import run_training

    results = {}
    runs_dir = out / "metric_runs"
    shutil.rmtree(runs_dir, ignore_errors=True)  # a run folder that exists is refused, not replaced
    for precision in ("fp32", "bf16"):
        overrides = [f"name=metric-{precision}", f"out_dir={runs_dir}", "data.dataset=mtd", f"data.root={data}",
                     f"train.device={s.device}", f"train.precision={precision}", *s.metric_overrides]
        if not any(item.startswith("model.weights=") for item in overrides):
            overrides.append(f"model.weights={weights}")
        started = time.perf_counter()
        torch.manual_seed(0)
        run_dir = run_training(load_config(None, overrides))
        results[precision] = {"metrics": read_json(run_dir / METRICS),
                              "seconds": time.perf_counter() - started}
    shutil.rmtree(runs_dir)  # model files need not travel back from the device
    fp32, bf16 = results["fp32"]["metrics"], results["bf16"]["metrics"]
    difference = {k: bf16[k] - v for k, v in fp32.items() if isinstance(v, float) and k in bf16}
    return {"overrides": list(s.metric_overrides), "runs": results, "bf16_minus_fp32": difference}


# ------------------------------------------------------------------------------------------ table


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(record: dict[str, Any]) -> str:
    one_time = "".join(f", {cost['cpu_s']:.0f} s of it building the {name} (cached for later calls)"
                       for name, cost in record["one_time"].items())
    head = (f"GPU suite: device {record['device']}, torch {record['torch']}, {record['date']}"
            f"{' (--quick: CPU smoke run, not a measurement)' if record['quick'] else ''}; "
            f"{record['wall_s']:.0f} s in all, {record['cpu_s']:.0f} s of CPU time{one_time}.")
    lines = [head, "", "| part | what | figure | target |", "|---|---|---|---|"]
    parts = record["parts"]

    def row(part: str, what: str, figure: str, target: str = "") -> None:
        lines.append(f"| {part} | {what} | {figure} | {target} |")

    for name in PARTS:
        result = parts.get(name)
        if result is None or "skipped" in result or "failed" in result:
            reason = "not run" if result is None else result.get("skipped") or result.get("failed")
            row(name, "-", f"not measured: {reason}")
            continue
        if name == "training":
            for encoder, r in result["encoders"].items():
                ips = r["images_per_s"]
                row(name, f"{encoder} @ {r['args']['size']} px, batch {r['args']['batch']}: ours ({r['precision']}, "
                    "feature cache) vs naive (fp32) images/s",
                    f"{ips['ours']:.1f} vs {ips['naive']:.1f} ({r['ratio']:.1f}x)", TARGETS["training_ratio"])
                if "pipeline_s" in r:
                    p, a = r["pipeline_s"], r["args"]
                    row(name, f"stage-1 pipeline, {encoder}: k = {a['k']} x {a['sub_its']} its + scoring "
                        f"{a['k']} x {a['n']} + {a['final_its']} its (extrapolated), s",
                        f"ours {p['ours_serial']:.0f} serial, {p['ours_streams']:.0f} with {p['streams']} on CUDA "
                        f"streams; naive {p['naive']:.0f}")
        elif name in ("inference", "compile"):
            for r in result["rows"]:
                target = TARGETS["inference_b1"] if r["batch"] == 1 else TARGETS["inference_b32"]
                what = f"{result['encoder']} @ {result['size']} px, {r['mode']} {r['precision']}, batch {r['batch']}"
                row(name, what,
                    f"{r['images_per_s']:.0f} images/s, p50 {r['latency_ms_p50']:.2f} ms, "
                    f"p99 {r['latency_ms_p99']:.2f} ms", target)
        elif name == "serving":
            for phase in result["phases"]:
                lat = phase["latency_ms"]
                mode = "sustained" if phase["fps_target"] == 0 else f"{phase['fps_target']:g} frames/s offered"
                target = TARGETS["serving_fps"] if phase["fps_target"] == 0 else TARGETS["serving_p99"]
                row(name, f"daemon ({phase['backend']}), {mode}, mean batch {phase['batches']['mean']:.1f}",
                    f"{phase['achieved_fps']:.1f} frames/s, p50 {_f(lat.get('p50'))} ms, p99 {_f(lat.get('p99'))} ms, "
                    f"drops {phase['drops']}", target)
        elif name == "parity":
            row(name, f"{result['candidate']} vs {result['reference']}, {result['encoder']}, "
                f"{result['images']} MTD images ({result['defects']} defects)",
                f"map {result['map_max_abs']:.2g}, score {result['score_max_abs']:.2g}, "
                f"Spearman {result['spearman']:.4f}, {'PASS' if result['passed'] else 'FAIL'} (bounds: map "
                f"{result['tolerance']['map_max_abs']:g}, score {result['tolerance']['score_max_abs']:g})")
        elif name == "metric":
            fp32, bf16 = (result["runs"][p]["metrics"] for p in ("fp32", "bf16"))
            for key in ("i_auroc", "i_ap", "p_auroc", "p_aupro"):
                if key in result["bf16_minus_fp32"]:
                    row(name, f"MTD {key}, fp32 vs bf16 training (short run)",
                        f"{fp32[key]:.4f} vs {bf16[key]:.4f} ({result['bf16_minus_fp32'][key]:+.4f})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny CPU settings (about 10 s of CPU): every part runs.")
    parser.add_argument("--out", type=Path, default=BENCH_OUT / "gpu_suite", help="Folder for the JSON and table.")
    parser.add_argument("--wheels", type=Path, default=BENCH_OUT / "wheels",
                        help="Wheels to install missing packages from (pip --no-index).")
    parser.add_argument("--data", type=Path, help="MTD root (default: bench_out/gpu_carry/mtd, else ../shared).")
    parser.add_argument("--weights", default="auto",
                        help="DINOv2 ViT-S/14 weights for the metric part: auto | random | PATH.")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"Comma list of {', '.join(PARTS)}.")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="No part starts after this many seconds (the device's 8 minutes, less a margin).")
    parser.add_argument("--prepare-carry", action="store_true", help="Write bench_out/gpu_carry/mtd and exit.")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    return args


def resolve_data(data: Path | None) -> Path:
    for candidate in (data, CARRY_DATA, SHARED / "data" / "mtd"):
        if candidate is not None and (candidate / "MT_Free").is_dir():
            return candidate.resolve()
    sys.exit("no MTD images: pass --data, or run --prepare-carry here and carry bench_out/gpu_carry")


def resolve_weights(weights: str) -> str:
    if weights != "auto":
        return weights
    path = SHARED / "weights" / "dinov2_vits14.safetensors"
    return str(path) if path.is_file() else "random"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare_carry:
        prepare_carry(resolve_data(args.data if args.data else SHARED / "data" / "mtd"), CARRY_DATA)
        return 0
    started = time.perf_counter()
    serving_unavailable = prepare_packages(args.wheels)
    import torch

    settings = quick_settings() if args.quick else full_settings()
    if settings.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible to torch: run on the device, or use --quick here")
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    data, weights = resolve_data(args.data), resolve_weights(args.weights)
    args.out = args.out.resolve()  # the serving subprocess runs in the repository
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = args.parts.split(",")
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "training": lambda: part_training(settings),
        "inference": lambda: part_inference(settings, settings.infer_modes),
        "compile": lambda: part_inference(settings, settings.compile_modes),
        "serving": lambda: part_serving(settings, args.out, serving_unavailable),
        "parity": lambda: part_parity(settings, data),
        "metric": lambda: part_metric(settings, args.out, data, weights),
    }
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    parts: dict[str, Any] = {}
    record = {
        "device": torch.cuda.get_device_name(0) if settings.device == "cuda" else cpu, "torch": torch.__version__,
        "python": platform.python_version(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick, "data": str(data), "weights": weights,
        "wall_s": 0.0, "cpu_s": 0.0, "cpu_s_without_one_time": 0.0, "one_time": {},
        "startup": {"seconds": round(time.perf_counter() - started, 1), "cpu_s": round(cpu_seconds(), 1)},
        "parts": parts,
    }
    for name in PARTS:
        if name not in wanted:
            continue
        elapsed = time.perf_counter() - started
        estimate = settings.part_estimates_s.get(name, 0.0)
        if name == "compile" and not settings.compile_modes:
            parts[name] = {"skipped": "--quick: torch.compile on a CPU needs a C++ toolchain and minutes"}
        elif elapsed + estimate > args.budget_s:
            parts[name] = {"skipped": f"time budget: {elapsed:.0f} s used + ~{estimate:.0f} s > {args.budget_s:.0f} s"}
        else:
            print(f"== {name} ({elapsed:.0f} s so far)", file=sys.stderr)
            part_started, part_cpu = time.perf_counter(), cpu_seconds()
            try:
                parts[name] = runners[name]()
            except Exception as err:  # noqa: BLE001 - one failed part must not cost the others' figures
                parts[name] = {"failed": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            parts[name]["seconds"] = round(time.perf_counter() - part_started, 1)
            parts[name]["cpu_s"] = round(cpu_seconds() - part_cpu, 1)
        record["wall_s"], record["cpu_s"] = time.perf_counter() - started, cpu_seconds()
        record["one_time"] = one_time_costs(parts)
        record["cpu_s_without_one_time"] = record["cpu_s"] - sum(c["cpu_s"] for c in record["one_time"].values())
        # After every part: a device call cut short by its time limit still brings back what it measured.
        write_outputs(record, args.out)
    print(markdown(record))
    return 0


def write_outputs(record: dict[str, Any], out: Path) -> None:
    (out / "gpu_suite.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / "gpu_suite.md").write_text(markdown(record) + "\n")


if __name__ == "__main__":
    sys.exit(main())
