"""End-to-end throughput and latency of `llb-edge serve` through loopback ZeroMQ (issue 5, section 7).

    .venv/bin/python bench/serve_throughput.py [--fps 0 1] [--duration 30] [--frames N] [--frame-size 1024]
        [--bundle DIR | --encoder vit_small_patch14_dinov2 --size 392 --weights auto --precisions fp32
         --ok-frames --rebuild] [--backend auto] [--max-batch 8] [--max-wait-ms 2] [--queue-size 8]
        [--post-workers 2] [--page off|closed|open]
        [--ort-threads N] [--cameras 1] [--warmup 2] [--window N] [--json PATH]

Three processes, as on a line PC:

- the daemon: `llb-edge serve BUNDLE` in a subprocess (``python -m llb_edge.cli serve``), intake
  and results on random 127.0.0.1 ports, ``--control off`` and ``--health-port off`` (with
  ``--page closed|open``: a free port, so the daemon keeps frames for the operator page);
- the producer: a separate process (multiprocessing, spawn) playing the camera(s). It PUSHes raw
  uint8 RGB frames of ``--frame-size`` x ``--frame-size`` (1024 by default, 3 MiB each) with the
  capture time in the header;
- the subscriber: this process, on the results PUB socket. A frame's latency is from its capture
  timestamp (stamped just before the send) to the result's receipt here.

Each ``--fps`` value is one phase against the same daemon, ``--duration`` seconds long (or
``--frames`` frames):

- ``--fps 0``: sustained throughput. The producer keeps at most ``--window`` frames per camera in
  flight (sent, not yet answered) and sends the next as soon as a result frees a slot, so the
  figure is the daemon's capacity, not how fast keep-newest can drop. The default window is the
  camera's queue (``--queue-size``): with every in-flight frame queued at once the queue is just
  full, and one frame more would be DROPPED. Latency in this mode includes queueing inside the
  daemon.
- ``--fps N``: N frames/s in total (round-robin over the cameras), never waiting for results; a
  daemon that cannot keep up answers the oldest queued frames DROPPED (reported as drops).

The first ``--warmup`` frames of each phase (ONNX Runtime's first runs) are sent and answered before
the clock starts and are not counted. Frames go round-robin over ``--cameras`` camera ids: one
camera's keep-newest queue holds ``--queue-size`` frames, so a single camera can never form a batch
larger than that; use several cameras (or a larger queue) to measure batching.

Reported per phase (Markdown tables on stdout; ``--json`` also writes everything as JSON):
frames sent, results received, drops (DROPPED results), other error results, frames missing (no
result at all), frames the PUSH socket could not hand over (not sent), achieved results/s (results
over first send -> last result), end-to-end latency p50/p90/p99/max, the batch sizes inferred from
the results (frames of one batch share the same ``infer`` latency and arrive together), and the
daemon's own per-stage latencies from the result headers (decode, queue, infer, post, total) plus
"outside", the end-to-end latency minus the daemon's total (serialisation, ZeroMQ, publishing).

``--page`` measures what the operator page (runtime/operator_page.py) costs the line: ``off`` (no
health server, no page), ``closed`` (the daemon keeps its per-camera rings, nobody looks) or ``open``
(a thread here polls the page's state and fetches every new live and gallery image, as the page's
script does in a browser, at the page's refresh interval).

Without ``--bundle`` a bundle is built once and cached under bench_out/serve_bundles/: the
InspectionModel of ``--encoder`` at ``--size`` with the real DINOv2 weights from
/work/shared/weights when present (``--weights auto``; ``random`` otherwise) and a randomly
initialised decoder (latency does not depend on trained decoder weights), exported with the
bundles' ONNX exporter (exporters/onnx_export.py) and described by a bundle.json (llb_edge.bundle).
Building needs torch; serving from ``--bundle`` does not. ``--rebuild`` re-exports. The JSON's
``bundle_build`` says what building cost in this call (null when the bundle came from the cache).

Post-processing depends on the threshold: a frame whose map crosses the pixel threshold gets the
full-resolution region search (the map resized to the frame, then connected components), one
that does not skips it. The built bundle's threshold is the lowest per-frame 99th percentile of the
map values of the bench's frames (uniform noise), so every frame has a region: the costly case (the
"with region" column says how many frames had one). ``--ok-frames`` raises it above any map value:
the common case on a line, OK frames, no region search.

Quick check with a tiny random encoder:

    .venv/bin/python bench/serve_throughput.py --encoder test_tiny_patch14 --size 56 --duration 5 --fps 0 5

CPU run, ViT-S/14 at 392 px, 1024 x 1024 raw frames (ONNX Runtime on CPU: ~2.2-2.4 s per image on
2 cores shared with a training run, so the fixed rate must stay below ~0.4 fps there):

    .venv/bin/python bench/serve_throughput.py --fps 0 0.25 --duration 45 --json bench_out/serve_vits14_cpu.json

GPU (after `pip install pyzmq onnxruntime-gpu`; fp16 graphs are what ort-cuda and TensorRT load):

    python bench/serve_throughput.py --encoder vit_base_patch14_dinov2 --precisions fp32 fp16 \
        --cameras 8 --max-batch 32 --fps 0 200 --duration 30
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from llb_edge.bundle import (
    MAP_OUTPUT,
    MAX_OUTPUT,
    SCORE_OUTPUT,
    BundleManifest,
    ModelFile,
    Preprocessing,
    Threshold,
    load_bundle,
    set_threshold,
    sha256_file,
    utc_now,
    write_manifest,
)
from llb_edge.data.transforms import Geometry
from llb_edge.protocol import ErrorCode, Heartbeat, ResultHeader, decode_published, encode_frame, raw_frame_header
from llb_edge.runtime.operator_page import REFRESH_MS, STATE_PATH
from llb_edge.runtime.supervise import DaemonProcess

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CACHE = REPO / "bench_out" / "serve_bundles"
ANY_LOOPBACK_PORT = "tcp://127.0.0.1:*"
STAGES = ("decode", "queue", "infer", "post", "total")
BENCH_THRESHOLD_KEY = "bench_threshold_q99_min"  # bundle.json extra: the default threshold of a built bundle
# Above any value of the map (1 - cosine similarity <= 2): every frame OK, no region search.
OK_FRAMES_THRESHOLD = 10.0
PROBE_TOP_FRACTION = 0.01  # of map pixels over the built bundle's default threshold
DEFAULT_FRAME_SIZE = 1024
# Weights files in /work/shared/weights for --weights auto, by encoder.
WEIGHT_FILES = {
    "vit_small_patch14_dinov2": "dinov2_vits14.safetensors",
    "vit_base_patch14_dinov2": "dinov2_vitb14.safetensors",
    "vit_small_patch14_reg4_dinov2": "dinov2_vits14_reg4.safetensors",
    "vit_base_patch14_reg4_dinov2": "dinov2_vitb14_reg4.safetensors",
}


# ------------------------------------------------------------------------------------------ bundle


def bench_images(frame_size: int, count: int = 2) -> list[np.ndarray]:
    """The frames the producer sends (in turn): uniform noise, uint8 RGB, the same on every run."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (frame_size, frame_size, 3), dtype=np.uint8) for _ in range(count)]


def parity_inputs(size: int, count: int) -> np.ndarray:
    """Model inputs for the torch backend's parity gate: noise at rising contrast, so scores spread.

    The gate's rank test needs images that do not all score alike; the bench bundle has no real
    images, and its decoder is random (timing only).
    """
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (count, size, size, 3)).astype(np.float32)
    contrast = np.linspace(0.0, 1.0, count, dtype=np.float32).reshape(-1, 1, 1, 1)
    return np.round(128 + (noise - 128) * contrast).astype(np.uint8)


def resolve_weights(encoder: str, weights: str) -> str:
    if weights != "auto":
        return weights
    name = WEIGHT_FILES.get(encoder)
    path = SHARED / "weights" / name if name else None
    return str(path) if path is not None and path.is_file() else "random"


def bundle_cache_dir(encoder: str, size: int, weights: str, precisions: list[str]) -> Path:
    tag = "random" if weights == "random" else Path(weights).stem
    return CACHE / f"{encoder}-{size}-{tag}-{'+'.join(precisions)}"


def build_bundle(encoder: str, size: int, weights: str, precisions: list[str], out_dir: Path) -> Path:
    """Export the InspectionModel (random decoder) to ONNX and write a bundle.json around it.

    The bundle also holds the model's torch weights and parity images, so ``--backend torch-cuda``
    (runtime/torch_backend.py) serves it too.
    """
    import torch

    from llb_edge.exporters.bundle_export import onnx_file_name
    from llb_edge.exporters.onnx_export import export_onnx
    from llb_edge.exporters.parity import DEFAULT_PARITY_IMAGES, PARITY_IMAGES_FILE
    from llb_edge.models.dinomaly import AnomalyScorer, InspectionModel, create_dinomaly
    from llb_edge.runtime.torch_backend import (
        TORCH_WEIGHTS_FILE,
        TORCH_WEIGHTS_FORMAT,
        TORCH_WEIGHTS_KEY,
        save_inspection_weights,
    )

    started = time.perf_counter()
    torch.manual_seed(0)
    dinomaly, record = create_dinomaly(encoder, size, weights)
    scorer = AnomalyScorer(size)
    model = InspectionModel(dinomaly, scorer).eval()
    geometry = Geometry(resize=round(size * 8 / 7), crop=size)
    probe = np.stack([geometry.to_model_input(image) for image in bench_images(DEFAULT_FRAME_SIZE)])
    with torch.no_grad():
        maps, _, _ = model(torch.from_numpy(probe))
    # At least the hottest 1% of each bench frame's map pixels cross it: every frame has a region,
    # so post-processing does the full-resolution region search (the costly case; see --ok-frames).
    per_frame = np.quantile(maps.numpy().reshape(len(probe), -1), 1 - PROBE_TOP_FRACTION, axis=1)
    threshold = float(per_frame.min())

    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        files: dict[str, ModelFile] = {}
        for precision in precisions:
            key, name = onnx_file_name(precision)
            export_onnx(model, staging / name, precision, metadata={"llb_edge.source_run": "bench"})
            files[key] = ModelFile(path=name, sha256=sha256_file(staging / name), format="onnx", precision=precision)
        weights_path = save_inspection_weights(model, staging / TORCH_WEIGHTS_FILE, encoder)
        files[TORCH_WEIGHTS_KEY] = ModelFile(path=TORCH_WEIGHTS_FILE, sha256=sha256_file(weights_path),
                                             format=TORCH_WEIGHTS_FORMAT, precision="fp32")
        np.save(staging / PARITY_IMAGES_FILE, parity_inputs(size, DEFAULT_PARITY_IMAGES))
        parity_record = {"path": PARITY_IMAGES_FILE, "sha256": sha256_file(staging / PARITY_IMAGES_FILE),
                         "count": DEFAULT_PARITY_IMAGES, "sources": ["bench: noise at rising contrast"]}
        created = utc_now()
        manifest = BundleManifest(
            model_id=f"bench-{encoder}-{size}",
            model_version="bench",
            created=created,
            source_run="bench/serve_throughput.py (random decoder: for timing only)",
            encoder=encoder,
            weights_sha256=str(record.get("sha256") or ""),
            preprocessing=Preprocessing(resize=round(size * 8 / 7), crop=size),
            map_size=scorer.map_size,
            outputs={
                MAP_OUTPUT: ["batch", 1, scorer.map_size, scorer.map_size],
                SCORE_OUTPUT: ["batch"],
                MAX_OUTPUT: ["batch"],
            },
            score_stats={},
            threshold=Threshold(
                value=threshold,
                method="bench: lowest 99th percentile of the bench frames' map values",
                set_by="bench/serve_throughput.py",
                set_at=created,
            ),
            files=files,
            extra={
                "backbone": record,
                "export_seconds": round(time.perf_counter() - started, 1),
                BENCH_THRESHOLD_KEY: threshold,
                "parity_images": parity_record,
            },
        )
        write_manifest(staging, manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"built bundle {out_dir} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return out_dir


def cached_bundle(args: argparse.Namespace) -> tuple[Path, dict[str, float] | None]:
    """The built bundle (from the cache when it loads), its threshold set for ``--ok-frames``.

    Also what building it cost in this call (wall and CPU seconds; None when it came from the
    cache): a one-time cost that callers timing the bench itself leave out (bench/gpu_suite.py).
    """
    weights = resolve_weights(args.encoder, args.weights)
    out_dir = bundle_cache_dir(args.encoder, args.size, weights, args.precisions)
    bundle, build = None, None
    if not args.rebuild:
        with contextlib.suppress(Exception):  # missing or broken cache: build it
            bundle = load_bundle(out_dir, verify=True)
    extra = bundle.manifest.extra if bundle is not None else {}
    if BENCH_THRESHOLD_KEY not in extra or "parity_images" not in extra:  # none, or built before they were added
        started, cpu_started = time.perf_counter(), time.process_time()
        bundle = load_bundle(build_bundle(args.encoder, args.size, weights, args.precisions, out_dir))
        build = {"seconds": round(time.perf_counter() - started, 1),
                 "cpu_s": round(time.process_time() - cpu_started, 1)}
    wanted = OK_FRAMES_THRESHOLD if args.ok_frames else float(bundle.manifest.extra[BENCH_THRESHOLD_KEY])
    if bundle.threshold != wanted:
        reason = "bench: --ok-frames" if args.ok_frames else "bench: lowest 99th percentile of the frames' map values"
        set_threshold(out_dir, wanted, set_by="bench/serve_throughput.py", reason=reason)
    return out_dir, build


# ------------------------------------------------------------------------------------------ daemon


def daemon_command(bundle: Path, args: argparse.Namespace) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "llb_edge.cli",
        "serve",
        str(bundle),
        "--intake",
        ANY_LOOPBACK_PORT,
        "--results",
        ANY_LOOPBACK_PORT,
        "--health-port",
        "off" if args.page == "off" else "0",
        "--control",
        "off",
        "--backend",
        args.backend,
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--queue-size",
        str(args.queue_size),
        "--post-workers",
        str(args.post_workers),
    ]
    if args.ort_threads is not None:
        command += ["--ort-threads", str(args.ort_threads)]
    return command


# ---------------------------------------------------------------------------------------- producer


@dataclass(frozen=True)
class ProducerConfig:
    intake: str
    phase: int
    fps: float
    duration_s: float | None
    frames: int | None
    frame_size: int
    cameras: int
    window: int | None  # frames in flight per camera; only with fps 0
    warmup: int
    warmup_timeout_s: float


def camera_id(index: int) -> str:
    return f"bench{index}"


def camera_index(value: str) -> int | None:
    return int(value[5:]) if value.startswith("bench") and value[5:].isdigit() else None


def frame_id(phase: int, index: int, warmup: bool = False) -> str:
    return f"p{phase}-{'w' if warmup else ''}{index}"


def parse_frame_id(value: int | str) -> tuple[int, bool] | None:
    """(phase, warm-up) of a bench frame id, None for anything else."""
    if not isinstance(value, str) or not value.startswith("p") or "-" not in value:
        return None
    phase, rest = value[1:].split("-", 1)
    return (int(phase), rest.startswith("w")) if phase.isdigit() else None


def produce(cfg: ProducerConfig, done: Any, report: Any) -> None:
    """The camera process. ``done[c]``: results received for camera c in this phase (the subscriber writes it)."""
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.sndhwm = 4
    sock.sndtimeo = 1000
    sock.linger = 5000
    sock.connect(cfg.intake)
    images = bench_images(cfg.frame_size)
    sent_to = [0] * cfg.cameras  # frames handed over per camera, warm-up included
    sent = not_sent = 0

    def send(index: int, camera: int, warmup: bool = False) -> bool:
        image = images[index % len(images)]
        header = raw_frame_header(camera_id(camera), frame_id(cfg.phase, index, warmup), image, capture_ts=time.time())
        try:
            sock.send_multipart(encode_frame(header, image), copy=False)
        except zmq.Again:
            return False
        sent_to[camera] += 1
        return True

    def answered() -> int:
        return sum(done[c] for c in range(cfg.cameras))

    # Warm-up: one frame at a time, each answered before the next.
    warm_sent = 0
    for index in range(cfg.warmup):
        warm_sent += send(index, index % cfg.cameras, warmup=True)
        deadline = time.monotonic() + cfg.warmup_timeout_s
        while answered() < warm_sent and time.monotonic() < deadline:
            time.sleep(0.001)

    started = time.time()
    deadline = None if cfg.duration_s is None else time.monotonic() + cfg.duration_s
    interval = 1.0 / cfg.fps if cfg.fps > 0 else 0.0
    next_send = time.monotonic()
    stalled = False
    index = 0
    camera = 0
    last_answered, last_progress = answered(), time.monotonic()

    def running() -> bool:
        if cfg.frames is not None and sent + not_sent >= cfg.frames:
            return False
        return deadline is None or time.monotonic() < deadline

    def free_camera(start: int) -> int | None:
        for offset in range(cfg.cameras):
            c = (start + offset) % cfg.cameras
            if sent_to[c] - done[c] < (cfg.window or 0):
                return c
        return None

    while running():
        if interval:
            delay = next_send - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            # A camera that fell behind does not burst to catch up.
            next_send = max(next_send + interval, time.monotonic() - interval)
        elif cfg.window is not None:
            while running() and (chosen := free_camera(camera)) is None:
                now = time.monotonic()
                if answered() != last_answered:
                    last_answered, last_progress = answered(), now
                elif now - last_progress > 120:
                    stalled = True
                    break
                time.sleep(0.0005)
            if stalled or not running():
                break
            camera = chosen
        if send(index, camera):
            sent += 1
        else:
            not_sent += 1
        index += 1
        camera = (camera + 1) % cfg.cameras
    ended = time.time()
    sock.close()
    context.term()
    report.put(
        {
            "sent": sent,
            "not_sent": not_sent,
            "warmup_sent": warm_sent,
            "started": started,
            "ended": ended,
            "stalled": stalled,
        }
    )


# -------------------------------------------------------------------------------------- subscriber


@dataclass
class Received:
    at: float  # time.time() at receipt
    header: ResultHeader


@dataclass
class Subscriber:
    """Reads the results socket in a thread; results are filed by bench phase."""

    endpoint: str
    context: zmq.Context = field(default_factory=zmq.Context)
    results: dict[int, list[Received]] = field(default_factory=dict)
    counters: dict[int, Any] = field(default_factory=dict)  # phase -> mp.Array of results received per camera
    heartbeats: list[Heartbeat] = field(default_factory=list)
    foreign: int = 0

    def __post_init__(self) -> None:
        self.sock = self.context.socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.rcvtimeo = 100
        self.sock.rcvhwm = 0  # never drop results on our side
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(self.endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.heartbeats:  # the first heartbeat proves the subscription is live
            if time.monotonic() > deadline:
                raise RuntimeError(f"no heartbeat from the daemon within {timeout_s} s")
            time.sleep(0.01)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                parts = self.sock.recv_multipart()
            except zmq.Again:
                continue
            at = time.time()
            message = decode_published(parts)
            if isinstance(message, Heartbeat):
                self.heartbeats.append(message)
                continue
            header = message[0]
            parsed = parse_frame_id(header.frame_id)
            if parsed is None:
                self.foreign += 1
                continue
            phase, _ = parsed
            self.results.setdefault(phase, []).append(Received(at, header))
            counter = self.counters.get(phase)
            camera = camera_index(header.camera_id)
            if counter is not None and camera is not None and camera < len(counter):
                counter[camera] += 1  # the only writer

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close(linger=0)
        self.context.term()


class PagePoller:
    """An open operator page: polls its state and fetches each new image, as its script does."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.state_s: list[float] = []
        self.image_s: list[float] = []
        self.image_bytes = 0
        self.failures: Counter[str] = Counter()  # HTTP status or exception name -> count
        self._seen: set[tuple[int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=10) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            # 404: a gallery frame newer NG frames pushed out of the ring before it was fetched
            self.failures[str(err.code)] += 1
        except (urllib.error.URLError, OSError) as err:
            self.failures[type(err).__name__] += 1
        return None

    def _loop(self) -> None:
        while not self._stop.wait(REFRESH_MS / 1000):
            started = time.perf_counter()
            body = self._get(STATE_PATH)
            self.state_s.append(time.perf_counter() - started)
            if body is None:
                continue
            for camera in json.loads(body)["cameras"]:
                wanted = [(frame["seq"], "mini") for frame in camera["gallery"]]
                if camera["latest"]:
                    wanted.insert(0, (camera["latest"]["seq"], "thumb"))
                for seq, view in wanted:
                    if (seq, view) in self._seen:
                        continue  # the browser keeps it (the image is cacheable)
                    self._seen.add((seq, view))
                    started = time.perf_counter()
                    data = self._get(f"/page/image/{seq}.jpg?view={view}")
                    self.image_s.append(time.perf_counter() - started)
                    self.image_bytes += len(data or b"")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=15)
        return {
            "state_requests": len(self.state_s),
            "state_ms": percentiles_ms(self.state_s),
            "images": len(self.image_s),
            "image_ms": percentiles_ms(self.image_s),
            "image_kib": round(self.image_bytes / 1024, 1),
            "failures": dict(self.failures),
        }


# ---------------------------------------------------------------------------------------- analysis


def percentiles_ms(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {}
    values = np.asarray(values_s) * 1000.0
    return {
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
        "max": float(values.max()),
        "mean": float(values.mean()),
    }


def inferred_batches(received: list[Received]) -> list[int]:
    """Batch sizes: consecutive results sharing one ``infer`` latency came from one batch."""
    sizes: list[int] = []
    previous = None
    for item in received:
        infer = item.header.latency_ms.get("infer")
        if sizes and infer is not None and infer == previous:
            sizes[-1] += 1
        else:
            sizes.append(1)
        previous = infer
    return sizes


def analyse(phase: int, fps: float, produced: dict[str, Any], received: list[Received]) -> dict[str, Any]:
    measured = [r for r in received if not parse_frame_id(r.header.frame_id)[1]]  # type: ignore[index]
    ok = [r for r in measured if r.header.error is None]
    codes = Counter(r.header.error.code.name for r in measured if r.header.error is not None)
    drops = codes.pop(ErrorCode.DROPPED.name, 0)
    e2e = [r.at - r.header.capture_ts for r in ok if r.header.capture_ts is not None]
    span = (max(r.at for r in ok) - produced["started"]) if ok else 0.0
    stages = {
        stage: percentiles_ms([r.header.latency_ms[stage] / 1000.0 for r in ok if stage in r.header.latency_ms])
        for stage in STAGES
    }
    stages["outside"] = percentiles_ms(
        [
            r.at - r.header.capture_ts - r.header.latency_ms["total"] / 1000.0
            for r in ok
            if r.header.capture_ts is not None and "total" in r.header.latency_ms
        ]
    )
    batches = inferred_batches(ok)
    return {
        "phase": phase,
        "fps_target": fps,
        "sent": produced["sent"],
        "not_sent": produced["not_sent"],
        "warmup": produced["warmup_sent"],
        "results": len(measured),
        "ok": len(ok),
        "with_region": sum(1 for r in ok if r.header.region is not None),
        "drops": drops,
        "errors": dict(codes),
        "missing": produced["sent"] - len(measured),
        "send_s": produced["ended"] - produced["started"],
        "offered_fps": produced["sent"] / max(1e-9, produced["ended"] - produced["started"]),
        "achieved_fps": len(ok) / span if span > 0 else 0.0,
        "latency_ms": percentiles_ms(e2e),
        "stages_ms": stages,
        "batches": {
            "count": len(batches),
            "mean": float(np.mean(batches)) if batches else 0.0,
            "sizes": dict(sorted(Counter(batches).items())),
        },
        "backend": ok[0].header.backend if ok else None,
        "stalled": produced["stalled"],
    }


def fmt(value: float | None, digits: int = 0) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far; 0 where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | frames sent | results | drops | errors | missing | not sent | frames/s | "
        "p50 ms | p90 ms | p99 ms | max ms | batch sizes (inferred) | with region |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mode = "sustained (fps 0)" if r["fps_target"] == 0 else f"fixed {r['fps_target']:g} fps"
        lat = r["latency_ms"]
        errors = sum(r["errors"].values())
        sizes = ", ".join(f"{size}x{count}" for size, count in r["batches"]["sizes"].items())
        lines.append(
            f"| {mode} | {r['sent']} | {r['ok']} | {r['drops']} | {errors} | {r['missing']} | {r['not_sent']} | "
            f"{r['achieved_fps']:.2f} | {fmt(lat.get('p50'))} | {fmt(lat.get('p90'))} | {fmt(lat.get('p99'))} | "
            f"{fmt(lat.get('max'))} | mean {r['batches']['mean']:.2f} ({sizes}) | "
            f"{100 * r['with_region'] / max(1, r['ok']):.0f}% |"
        )
    lines += [
        "",
        "Daemon per-stage latency from the result headers, ms, p50 / p99 (outside = end-to-end - total):",
        "",
        "| mode | " + " | ".join([*STAGES, "outside"]) + " |",
        "|---|" + "---|" * (len(STAGES) + 1),
    ]
    for r in results:
        mode = "sustained (fps 0)" if r["fps_target"] == 0 else f"fixed {r['fps_target']:g} fps"
        cells = []
        for stage in (*STAGES, "outside"):
            values = r["stages_ms"].get(stage) or {}
            digits = 1 if values and values["p99"] < 100 else 0
            cells.append(f"{fmt(values.get('p50'), digits)} / {fmt(values.get('p99'), digits)}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main


def run_phase(
    phase: int, fps: float, args: argparse.Namespace, intake: str, subscriber: Subscriber, spawn: Any
) -> dict[str, Any]:
    done = spawn.Array("q", args.cameras)
    subscriber.counters[phase] = done
    window = args.window
    if window is None and fps == 0:
        window = args.queue_size  # all in flight and queued at once fill the queue, never overfill it
    cfg = ProducerConfig(
        intake=intake,
        phase=phase,
        fps=fps,
        duration_s=None if args.frames and not args.duration else args.duration,
        frames=args.frames,
        frame_size=args.frame_size,
        cameras=args.cameras,
        window=window if fps == 0 else None,
        warmup=args.warmup,
        warmup_timeout_s=args.warmup_timeout,
    )
    report = spawn.Queue()
    producer = spawn.Process(target=produce, args=(cfg, done, report), name=f"producer-{phase}")
    producer.start()
    produced = None
    while produced is None:
        try:
            produced = report.get(timeout=1.0)
        except queue.Empty:
            if not producer.is_alive():
                raise RuntimeError(f"the producer process died (exit code {producer.exitcode})") from None
    producer.join(timeout=30)
    # Drain: wait for every sent frame's result, or until results stop coming.
    expected = produced["sent"] + produced["warmup_sent"]
    last_count, last_change = sum(done), time.monotonic()
    while sum(done) < expected and time.monotonic() - last_change < args.drain_idle:
        time.sleep(0.05)
        if sum(done) != last_count:
            last_count, last_change = sum(done), time.monotonic()
    result = analyse(phase, fps, produced, list(subscriber.results.get(phase, [])))
    result["window"] = cfg.window
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    model = parser.add_argument_group("bundle")
    model.add_argument("--bundle", type=Path, help="Serve this bundle instead of building one.")
    model.add_argument(
        "--encoder",
        default="vit_small_patch14_dinov2",
        help="Encoder of the built bundle (test_tiny_patch14 for a quick check).",
    )
    model.add_argument("--size", type=int, default=392, help="Model input size of the built bundle.")
    model.add_argument(
        "--weights",
        default="auto",
        help="auto (DINOv2 file in /work/shared/weights, else random) | random | a .safetensors path.",
    )
    model.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "fp16"],
        help="ONNX graphs in the built bundle; ort-cpu loads fp32, ort-cuda fp16.",
    )
    model.add_argument("--rebuild", action="store_true", help="Rebuild the cached bundle.")
    model.add_argument(
        "--ok-frames",
        action="store_true",
        help="Built bundle only: threshold above every map value, so each frame is OK and skips the "
        "full-resolution region search (default: threshold just above random frames' scores, so every "
        "frame's map crosses it and post-processing does the region search: the worst case).",
    )
    serve = parser.add_argument_group("daemon")
    serve.add_argument("--backend", default="auto",
                       help="auto | tensorrt | ort-cuda | openvino | ort-cpu | torch-cuda | torch-cpu.")
    serve.add_argument("--max-batch", type=int, default=8)
    serve.add_argument("--max-wait-ms", type=float, default=2.0)
    serve.add_argument("--queue-size", type=int, default=8, help="Frames per camera (keep-newest).")
    serve.add_argument("--post-workers", type=int, default=2, help="Daemon threads post-processing results.")
    serve.add_argument("--ort-threads", type=int, help="ONNX Runtime intra-op threads (default: all cores).")
    serve.add_argument(
        "--page",
        choices=["off", "closed", "open"],
        default="off",
        help="Operator page: off (no health server), closed (served, nobody looks), open (polled like a browser).",
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--fps",
        type=float,
        nargs="+",
        default=[0.0],
        help="One phase per value; 0 = sustained throughput with a bounded window.",
    )
    load.add_argument("--duration", type=float, default=30.0, help="Seconds of sending per phase.")
    load.add_argument("--frames", type=int, help="Stop a phase after this many frames (with --duration 0: only).")
    load.add_argument(
        "--frame-size", type=int, default=DEFAULT_FRAME_SIZE, help="Raw RGB frames of this many pixels square."
    )
    load.add_argument("--cameras", type=int, default=1, help="Camera ids the frames go round-robin over.")
    load.add_argument(
        "--window", type=int, help="Frames in flight per camera with --fps 0 (default: queue size, +1 for one camera)."
    )
    load.add_argument("--warmup", type=int, default=2, help="Unmeasured frames answered before each phase.")
    load.add_argument("--warmup-timeout", type=float, default=60.0, help="Seconds to wait per warm-up result.")
    load.add_argument(
        "--drain-idle",
        type=float,
        default=20.0,
        help="After sending, stop waiting for results when none came for this long.",
    )
    parser.add_argument("--json", type=Path, help="Also write the results as JSON here.")
    args = parser.parse_args()
    if not args.duration and not args.frames:
        parser.error("give --duration or --frames")
    if args.cameras < 1 or args.frame_size < 1 or any(f < 0 for f in args.fps):
        parser.error("--cameras and --frame-size must be >= 1, --fps >= 0")
    return args


def main() -> None:
    args = parse_args()
    bundle, bundle_build = (args.bundle, None) if args.bundle else cached_bundle(args)
    manifest = load_bundle(bundle, verify=False).manifest
    load_before = os.getloadavg()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    command = daemon_command(bundle, args)
    print("daemon: " + " ".join(command), file=sys.stderr)
    daemon = DaemonProcess(command, cwd=REPO)
    spawn = mp.get_context("spawn")
    results: list[dict[str, Any]] = []
    stopped = None
    page: dict[str, Any] | None = None
    try:
        serving = daemon.wait_for("serving", timeout_s=300)
        subscriber = Subscriber(serving["results"])
        subscriber.start()
        poller = PagePoller(serving["health"]) if args.page == "open" else None
        if poller is not None:
            poller.start()
        try:
            for phase, fps in enumerate(args.fps):
                print(f"phase {phase}: fps {fps:g}, {args.duration} s ...", file=sys.stderr)
                cpu_before, wall_before = process_cpu_s(daemon.process.pid), time.monotonic()
                results.append(run_phase(phase, fps, args, serving["intake"], subscriber, spawn))
                cpu_s = process_cpu_s(daemon.process.pid) - cpu_before
                results[-1]["daemon_cpu_s"] = round(cpu_s, 2)
                results[-1]["daemon_cpu_per_s"] = round(cpu_s / (time.monotonic() - wall_before), 3)
                results[-1]["daemon_cpu_ms_per_result"] = round(1000 * cpu_s / max(1, results[-1]["results"]), 1)
        finally:
            page = poller.stop() if poller is not None else None
            stopped = daemon.stop()
            time.sleep(0.2)  # the final heartbeat
            subscriber.stop()
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
    load_after = os.getloadavg()

    import onnxruntime

    backend = next((r["backend"] for r in results if r["backend"]), args.backend)
    print(
        f"\n`llb-edge serve` end to end through loopback ZeroMQ, producer in another process. {started_at}, "
        f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} -> {load_after[0]:.2f} (1 min), "
        f"onnxruntime {onnxruntime.__version__}."
    )
    print(
        f"Model {manifest.model_id} (encoder {manifest.encoder}, input {manifest.preprocessing.crop} px, "
        f"map {manifest.map_size}, threshold {manifest.threshold.value:.4g}), backend {backend}; "
        f"{args.frame_size}x{args.frame_size}x3 uint8 raw frames, "
        f"{args.cameras} camera(s); max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms, "
        f"queue {args.queue_size}/camera, {args.post_workers} post workers, ORT threads {args.ort_threads or 'all'}, "
        f"operator page {args.page}; "
        f"{args.duration:g} s per phase after {args.warmup} warm-up frame(s); sustained window "
        f"{next((r['window'] for r in results if r['window']), '-')} frames in flight per camera.\n"
    )
    print(markdown(results))
    if stopped is not None:
        print(
            f"\nDaemon totals at shutdown: frames {stopped.get('frames')}, errors {stopped.get('errors')}, "
            f"drops {stopped.get('drops')}, queued at stop {stopped.get('queued_at_stop')}."
        )
    for result in results:
        print(
            f"\nDaemon CPU, phase {result['phase']} (warm-up and drain included): {result['daemon_cpu_s']} s, "
            f"{result['daemon_cpu_per_s']} CPU-s per s, {result['daemon_cpu_ms_per_result']} ms per result."
        )
    if page is not None:
        print(
            f"\nOperator page open (polled every {REFRESH_MS} ms): {page['state_requests']} state requests "
            f"(p50 {page['state_ms'].get('p50', 0):.1f} ms, p99 {page['state_ms'].get('p99', 0):.1f} ms), "
            f"{page['images']} images ({page['image_kib']} KiB; p50 {page['image_ms'].get('p50', 0):.1f} ms, "
            f"p99 {page['image_ms'].get('p99', 0):.1f} ms), failed requests: {page['failures'] or 'none'}."
        )
    if any(r["stalled"] for r in results):
        print("\nWARNING: a sustained phase stalled (no result for 120 s with the window full).")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "started": started_at,
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": load_after,
            "bundle": str(bundle),
            "bundle_build": bundle_build,
            "daemon_command": command,
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "daemon_stopped": stopped,
            "phases": results,
            "operator_page": page,
            "manifest_extra": asdict(manifest)["extra"],
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
