"""ONNX -> TensorRT engine with the TensorRT Python API, cached per (model, TensorRT, GPU, precision, profile).

UNTESTED ON GPU HERE: TensorRT cannot be installed on the development and CI machines
(line-side.md), so everything that calls ``tensorrt`` is written against the documented TensorRT
10 and 11 Python APIs and exercised only where ``import tensorrt`` works (tests use
``pytest.importorskip("tensorrt")``). The pure parts (build plan, cache key and path, profile
shapes, the trtexec command) are tested everywhere.

Build (TensorRT docs, "Builder -> network -> OnnxParser -> builder config -> serialized engine"):

- TensorRT 10, fp16 (default): the fp32 ONNX, ``BuilderFlag.FP16`` (weak typing: TensorRT picks
  fp16 kernels where it likes). LayerNorm (INormalizationLayer) is pinned to fp32 with
  ``PREFER_PRECISION_CONSTRAINTS``: its fp16 variance overflows on DINOv2 tokens.
- TensorRT 11 (precision flags removed, every network strongly typed), or TensorRT 10 with
  ``strongly_typed=True``: the bundle's fp16 ONNX, whose explicit Casts keep LayerNorm, linear
  attention and the scorer in fp32 (exporters/onnx_export.py).
- fp32 engines: the fp32 ONNX with TF32 off, so the fp32 parity bar applies.
- An optimisation profile over the batch axis (min/opt/max), a workspace limit, and a timing
  cache file that is loaded before and saved after every build (rebuilds take seconds).

Engines run only on the TensorRT version and GPU architecture they were built with, so engines
are cached under a key of (ONNX sha256, TensorRT version, GPU name and compute capability,
precision, profile) and the bundle records that target. The engine must pass the parity gate
against ONNX Runtime (exporters/parity.py) before it is accepted: fp16 ViT engines have silently
lost accuracy before (NVIDIA/TensorRT #3893).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llb_edge.bundle import INPUT_NAME, sha256_file
from llb_edge.errors import LLBEdgeError
from llb_edge.exporters import parity

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_BYTES = 4 << 30
ENGINE_SUFFIX = ".engine"
CACHE_ENV = "LLB_EDGE_ENGINE_CACHE"


class TensorRTError(LLBEdgeError, RuntimeError):
    """TensorRT missing, a parse or build failure, or an engine that fails its parity gate."""


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile over the dynamic batch axis: engines accept min..max images."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    def shapes(self, input_size: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of the uint8 NHWC input at ``input_size``."""
        def shape(batch: int) -> tuple[int, ...]:
            return batch, input_size, input_size, 3

        return shape(self.min), shape(self.opt), shape(self.max)

    def label(self) -> str:
        return f"b{self.min}-{self.opt}-{self.max}"


@dataclass(frozen=True)
class GpuInfo:
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # e.g. "9.0"

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")

    def slug(self) -> str:
        """File-name-safe short form, e.g. ``nvidia-h100-80gb-hbm3-sm90``."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") + f"-{self.sm}"


@dataclass(frozen=True)
class BuildPlan:
    """Which ONNX file and which flags a build uses, decided by TensorRT version and precision."""

    trt_major: int
    precision: str  # fp32 | fp16: of the engine
    onnx_precision: str  # fp32 | fp16: of the ONNX file parsed
    strongly_typed: bool
    fp16_flag: bool  # TensorRT 10 weak typing: BuilderFlag.FP16
    disable_tf32: bool  # fp32 engines: true fp32 so the fp32 parity bar holds


def trt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError as err:
        raise TensorRTError(f"cannot read a TensorRT version from {version!r}") from err


def build_plan(trt_version: str, precision: str = "fp16", strongly_typed: bool | None = None) -> BuildPlan:
    """The build recipe for this TensorRT version (module docstring).

    ``strongly_typed`` None means the version's default: off for TensorRT 10 (builder flag), always
    on from 11 (where it cannot be switched off).
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"engine precision must be fp32 or fp16, got {precision!r}")
    major = trt_major(trt_version)
    if major < 10:
        raise TensorRTError(f"TensorRT {trt_version} is too old: llb-edge builds with TensorRT 10 or 11")
    if major >= 11:
        if strongly_typed is False:
            raise TensorRTError("TensorRT 11 networks are always strongly typed; strongly_typed=False is impossible")
        typed = True
    else:
        typed = bool(strongly_typed)
    if precision == "fp32":
        return BuildPlan(major, "fp32", "fp32", typed, fp16_flag=False, disable_tf32=True)
    if typed:
        return BuildPlan(major, "fp16", "fp16", True, fp16_flag=False, disable_tf32=False)
    return BuildPlan(major, "fp16", "fp32", False, fp16_flag=True, disable_tf32=False)


def engine_cache_key(
    onnx_sha256: str, trt_version: str, gpu: GpuInfo, precision: str, profile: BatchProfile,
    strongly_typed: bool = False,
) -> str:
    """A stable key for an engine: equal inputs, equal key; any change in them, another engine.

    The build mode (strongly typed or not) is part of it: the same fp32 ONNX built both ways gives
    different engines on TensorRT 10.
    """
    identity = {
        "onnx_sha256": onnx_sha256,
        "tensorrt": trt_version,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "precision": precision,
        "profile": [profile.min, profile.opt, profile.max],
        "strongly_typed": strongly_typed,
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    """``$LLB_EDGE_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/llb-edge/engines`` (``~/.cache/...``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llb-edge" / "engines"


def engine_cache_path(cache_dir: str | Path, key: str, gpu: GpuInfo, trt_version: str, precision: str) -> Path:
    """Where the engine for ``key`` lives: readable prefix (precision, GPU, TensorRT), key suffix."""
    return Path(cache_dir) / f"{precision}-{gpu.slug()}-trt{trt_version}-{key}{ENGINE_SUFFIX}"


def timing_cache_path(cache_dir: str | Path, gpu: GpuInfo, trt_version: str) -> Path:
    """One timing cache per GPU model and TensorRT version, shared by all builds there."""
    return Path(cache_dir) / f"timing-{gpu.slug()}-trt{trt_version}.cache"


def bundle_engine_name(gpu: GpuInfo, trt_version: str, precision: str) -> tuple[str, str]:
    """(bundle.json files key, file name) for an engine: one bundle may hold engines for several GPUs."""
    tag = f"{gpu.sm}-trt{trt_version}"
    return f"tensorrt-{precision}-{tag}", f"model_{precision}_{gpu.slug()}_trt{trt_version}{ENGINE_SUFFIX}"


@dataclass(frozen=True)
class EngineJob:
    """One engine build: what :func:`build_engine` runs through the TensorRT API and
    :func:`trtexec_command` prints as the equivalent command line."""

    onnx_path: Path  # the graph the plan asks for (fp16 ONNX when strongly typed fp16)
    engine_path: Path
    input_size: int
    plan: BuildPlan
    profile: BatchProfile
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    timing_cache: Path | None = None


def trtexec_command(job: EngineJob) -> str:
    """The trtexec command line that builds the same engine as :func:`build_engine`.

    Printed with every build so an engineer can reproduce or profile the engine by hand. trtexec
    cannot pin single layers by type, so the TensorRT 10 fp16 line lacks the LayerNorm fp32 pin.
    """
    plan = job.plan
    shape = {name: f"{INPUT_NAME}:{'x'.join(map(str, dims))}"
             for name, dims in zip(("min", "opt", "max"), job.profile.shapes(job.input_size), strict=True)}
    parts = [
        "trtexec",
        f"--onnx={job.onnx_path}",
        f"--saveEngine={job.engine_path}",
        f"--minShapes={shape['min']}",
        f"--optShapes={shape['opt']}",
        f"--maxShapes={shape['max']}",
        f"--memPoolSize=workspace:{max(1, job.workspace_bytes >> 20)}M",
    ]
    if job.timing_cache is not None:
        parts.append(f"--timingCacheFile={job.timing_cache}")
    if plan.fp16_flag:
        parts.append("--fp16")
    if plan.strongly_typed and plan.trt_major < 11:
        parts.append("--stronglyTyped")  # always on, and no longer accepted as a flag, from TensorRT 11
    if plan.disable_tf32:
        parts.append("--noTF32")
    return shlex.join(parts)


@dataclass
class EngineBuild:
    """An engine that passed its parity gate: where it is, what built it, and where it can run."""

    engine_path: Path
    key: str
    cached: bool  # True: reused from the engine cache, no build ran
    seconds: float
    trt_version: str
    gpu: GpuInfo
    plan: BuildPlan
    profile: BatchProfile
    onnx_sha256: str
    trtexec: str
    parity: dict[str, Any] = field(default_factory=dict)

    def target(self) -> dict[str, Any]:
        """What bundle.json records in ModelFile.target: where this engine can run."""
        return {
            "tensorrt": self.trt_version,
            "gpu": self.gpu.name,
            "compute_capability": self.gpu.compute_capability,
            "profile": asdict(self.profile),
            "strongly_typed": self.plan.strongly_typed,
            "onnx_sha256": self.onnx_sha256,
            "cache_key": self.key,
            "trtexec": self.trtexec,
        }


def import_tensorrt() -> Any:
    """``import tensorrt`` with an error that says what to do when it is missing."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise TensorRTError(
            "TensorRT is not installed here (import tensorrt failed). Engines are built on the target "
            "machine: install TensorRT 10 or 11 there (e.g. JetPack, or pip install tensorrt from NVIDIA's "
            "index) and run `llb-edge export RUN_DIR --format tensorrt` (or build from a copied bundle) there."
        ) from err
    return trt


def detect_gpu(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device``: nvidia-smi, else torch, else cuda-python."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, f"--id={device}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout.strip()
            name, cap = (part.strip() for part in out.splitlines()[0].rsplit(",", 1))
            if name and re.fullmatch(r"\d+\.\d+", cap):
                return GpuInfo(name, cap)
        except (subprocess.SubprocessError, OSError, ValueError, IndexError):
            pass  # old drivers lack compute_cap; Jetson has no nvidia-smi: try the next source
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return GpuInfo(torch.cuda.get_device_name(device), f"{major}.{minor}")
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart

        error, props = cudart.cudaGetDeviceProperties(device)
        if int(error) == 0:
            name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(
                props.name)
            return GpuInfo(name, f"{props.major}.{props.minor}")
    except ImportError:
        pass
    raise TensorRTError("no CUDA GPU found (nvidia-smi, torch and cuda-python all failed to report one)")


def _parser_errors(parser: Any) -> list[str]:
    messages = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        where = ""
        try:  # node_name / node_operator exist from TensorRT 10
            where = f" at node {error.node_name()!r} ({error.node_operator()})"
        except AttributeError:
            where = f" at node #{error.node()}"
        messages.append(f"{error.desc()}{where} [{error.code()}]")
    return messages


def build_engine(job: EngineJob) -> Path:
    """Parse ``job.onnx_path`` and build a serialized engine at ``job.engine_path``. UNTESTED ON GPU HERE."""
    onnx_path, plan, timing_cache = job.onnx_path, job.plan, job.timing_cache
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    # Explicit batch is implied from TensorRT 10 (the flag is deprecated and ignored there).
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        details = "\n  ".join(_parser_errors(parser)) or "no details reported"
        raise TensorRTError(f"TensorRT's ONNX parser rejects {onnx_path}:\n  {details}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(job.workspace_bytes))
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
        # Keep normalisation in fp32 (prefer, not obey: a missing fp32 tactic must not fail the build).
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.precision = trt.float32
                for output in range(layer.num_outputs):
                    layer.set_output_type(output, trt.float32)
    if plan.disable_tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)

    optimisation = builder.create_optimization_profile()
    low, opt, high = job.profile.shapes(job.input_size)
    optimisation.set_shape(INPUT_NAME, low, opt, high)
    config.add_optimization_profile(optimisation)

    cache = None
    if timing_cache is not None:
        cache_file = Path(timing_cache)
        data = cache_file.read_bytes() if cache_file.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path = job.engine_path
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(f".{engine_path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(memoryview(serialized))
    os.replace(tmp, engine_path)
    if cache is not None and timing_cache is not None:
        cache_file = Path(timing_cache)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp_cache = cache_file.with_name(f".{cache_file.name}.tmp")
        with open(tmp_cache, "wb") as handle:
            handle.write(memoryview(config.get_timing_cache().serialize()))
        os.replace(tmp_cache, cache_file)
    return engine_path


def engine_runner(engine_path: str | Path, max_batch: int) -> tuple[parity.Runner, Callable[[], None]]:
    """(runner, close) executing the engine through the line runtime's TensorRT backend.

    The same code that serves the engine on the line is what the parity gate checks.
    """
    from llb_edge.runtime.backends import TensorRTBackend

    backend = TensorRTBackend(engine_path, max_batch=max_batch)
    return backend.run, backend.close


def build_checked_engine(
    onnx_paths: dict[str, Path],
    input_size: int,
    images: np.ndarray,
    precision: str = "fp16",
    profile: BatchProfile | None = None,
    cache_dir: str | Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    strongly_typed: bool | None = None,
    gpu: GpuInfo | None = None,
    runner_factory: Callable[[Path, int], tuple[parity.Runner, Callable[[], None]]] = engine_runner,
) -> EngineBuild:
    """Build (or reuse from the cache) an engine and accept it only if it passes parity. UNTESTED ON GPU HERE.

    ``onnx_paths`` maps ONNX precision to file (the bundle's fp32 and fp16 graphs). The reference is
    ONNX Runtime on the fp32 graph; the tolerance is the engine precision's. A cached engine is
    re-checked too (cheap, and a cache can be stale or corrupted).
    """
    trt = import_tensorrt()
    version = str(trt.__version__)
    plan = build_plan(version, precision, strongly_typed)
    if plan.onnx_precision not in onnx_paths:
        raise TensorRTError(f"this build needs the {plan.onnx_precision} ONNX graph, which the bundle lacks")
    if "fp32" not in onnx_paths:
        raise TensorRTError("the parity reference needs the fp32 ONNX graph, which the bundle lacks")
    source = Path(onnx_paths[plan.onnx_precision])
    profile = profile or BatchProfile()
    gpu = gpu or detect_gpu()
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    onnx_sha = sha256_file(source)
    key = engine_cache_key(onnx_sha, version, gpu, precision, profile, plan.strongly_typed)
    engine_path = engine_cache_path(cache_root, key, gpu, version, precision)
    timing = timing_cache_path(cache_root, gpu, version)
    job = EngineJob(source, engine_path, input_size, plan, profile, workspace_bytes, timing)
    command = trtexec_command(job)
    log.info("TensorRT %s on %s (%s): equivalent command:\n  %s", version, gpu.name, gpu.sm, command)
    started = time.perf_counter()
    cached = engine_path.is_file()
    if not cached:
        build_engine(job)
    seconds = time.perf_counter() - started
    run, close = runner_factory(engine_path, profile.max)
    try:
        report = parity.check_backend_parity(onnx_paths["fp32"], images, run, precision, "tensorrt")
    finally:
        close()
    if not report.passed:
        # A failing engine must not be reused from the cache either.
        engine_path.unlink(missing_ok=True)
        raise TensorRTError(f"TensorRT engine rejected by the parity gate: {report.summary()} "
                            f"({'; '.join(report.failures)})")
    return EngineBuild(engine_path=engine_path, key=key, cached=cached, seconds=seconds, trt_version=version,
                       gpu=gpu, plan=plan, profile=profile, onnx_sha256=onnx_sha, trtexec=command,
                       parity=report.to_dict())
