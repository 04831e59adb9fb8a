"""Inference backends: run a bundle's model on a batch of uint8 images.

Every backend honours the bundle graph contract (llb_edge.bundle): input uint8 [B, H, W, 3] at the
crop size, outputs the anomaly map float32 [B, 1, M, M], score [B] and score_max [B].

Selection (``create_backend(bundle, "auto")``): a TensorRT engine from the bundle when ``tensorrt``
imports and the engine deserialises on this GPU, else ONNX Runtime with the CUDA provider when
onnxruntime-gpu is installed, else OpenVINO on the CPU when ``openvino`` imports and the bundle
holds variants built and gated on this CPU (fastest first: runtime/openvino_backend.py), else
ONNX Runtime on CPU. OpenVINO on the plain fp32 graph is as fast as ONNX Runtime (issue 17), so
auto does not switch engines for it; ``--backend openvino`` asks for it. Each failed candidate
is logged with its reason, so a line PC that silently fell back to CPU is visible in the logs and
in /metrics.

No torch at module level: the line PC may not have it. onnxruntime, openvino and tensorrt are
imported when a backend is created, so the protocol tools (replay, watch) import this package
without them.
"""

from __future__ import annotations

import logging
import math
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from llb_edge.bundle import (
    INPUT_NAME,
    MAP_OUTPUT,
    MAX_OUTPUT,
    SCORE_OUTPUT,
    Bundle,
    confined_path,
    stage_model_file,
)
from llb_edge.errors import LLBEdgeError
from llb_edge.runtime.logs import get_logger, log_event

# torch-cuda / torch-cpu (runtime/torch_backend.py) are explicit choices only: auto never imports torch.
TORCH_BACKENDS = ("torch-cuda", "torch-cpu")
BACKEND_CHOICES = ("auto", "tensorrt", "ort-cuda", "openvino", "ort-cpu", *TORCH_BACKENDS)
DEFAULT_MAX_BATCH = 16

BackendOutputs = tuple[np.ndarray, np.ndarray, np.ndarray]

logger = get_logger("backends")


class BackendError(LLBEdgeError, RuntimeError):
    """A backend that cannot be created or a model that fails its self-check."""


def pad_batch(batch: np.ndarray, fixed_batch: int | None) -> np.ndarray:
    """``batch`` padded with black images to ``fixed_batch``: a graph with a fixed batch takes only that many."""
    if fixed_batch is None or len(batch) >= fixed_batch:
        return batch
    return np.concatenate([batch, np.zeros((fixed_batch - len(batch), *batch.shape[1:]), dtype=batch.dtype)])


class Backend(ABC):
    """Runs batches of model inputs. Not thread-safe: the daemon calls it from one thread."""

    name: str
    max_batch: int

    def run(self, batch: np.ndarray) -> BackendOutputs:
        """uint8 [B, H, W, 3] -> (maps float32 [B, 1, M, M], scores [B], maxes [B]).

        Batches larger than ``max_batch`` are split, so callers need not know the engine's limit.
        """
        if batch.ndim != 4 or batch.shape[3] != 3 or batch.dtype != np.uint8:
            raise BackendError(f"expected a uint8 [B, H, W, 3] batch, got {batch.dtype} {batch.shape}")
        chunks = [self._run_chunk(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        maps, scores, maxes = (np.concatenate(parts) for parts in zip(*chunks, strict=True))
        return maps, scores, maxes

    @abstractmethod
    def _run_chunk(self, batch: np.ndarray) -> BackendOutputs:
        """Run at most ``max_batch`` images."""

    def close(self) -> None:  # noqa: B027 - optional hook; ORT sessions need none
        """Release device memory; the backend is not used afterwards."""


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on CPU or with the CUDA execution provider (onnxruntime-gpu)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "cpu",
        max_batch: int = DEFAULT_MAX_BATCH,
        intra_op_threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        if device not in ("cpu", "cuda"):
            raise BackendError(f"device must be cpu or cuda, got {device!r}")
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3  # ORT's own warnings are noise on the line; errors still raise
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        except Exception as err:  # noqa: BLE001 - ORT raises its own exception family for bad models
            raise BackendError(f"ONNX Runtime cannot load {model_path}: {err}") from err
        # ORT falls back to CPU silently when CUDA fails to initialise; refuse that instead.
        if device == "cuda" and self._session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendError(f"ONNX Runtime did not enable CUDA (providers {self._session.get_providers()})")
        inputs = {item.name: item for item in self._session.get_inputs()}
        outputs = {item.name for item in self._session.get_outputs()}
        missing = [name for name in (MAP_OUTPUT, SCORE_OUTPUT, MAX_OUTPUT) if name not in outputs]
        if INPUT_NAME not in inputs or missing:
            raise BackendError(
                f"{model_path} breaks the graph contract: needs input {INPUT_NAME!r} and outputs "
                f"{MAP_OUTPUT}, {SCORE_OUTPUT}, {MAX_OUTPUT} (missing: {missing or INPUT_NAME})"
            )
        batch_dim = inputs[INPUT_NAME].shape[0]
        # A graph exported with a fixed batch only accepts exactly that many images: pad to it.
        self._fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.max_batch = self._fixed_batch or max(1, max_batch)
        self.name = f"ort-{device}"

    def _run_chunk(self, batch: np.ndarray) -> BackendOutputs:
        count = len(batch)
        batch = pad_batch(batch, self._fixed_batch)
        maps, scores, maxes = self._session.run([MAP_OUTPUT, SCORE_OUTPUT, MAX_OUTPUT], {INPUT_NAME: batch})
        return (
            np.asarray(maps, dtype=np.float32)[:count],
            np.asarray(scores, dtype=np.float32).reshape(-1)[:count],
            np.asarray(maxes, dtype=np.float32).reshape(-1)[:count],
        )


class _CudaMemory:
    """Device buffers and one stream for the TensorRT backend, through cuda-python or else torch."""

    def __init__(self) -> None:
        self._cudart: Any = None
        self._torch: Any = None
        self._tensors: dict[int, Any] = {}  # torch path: pointer -> the tensor that owns it
        self._pointers: list[int] = []  # cuda-python path
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6

            self._cudart = cudart
            self.stream = int(self._check(cudart.cudaStreamCreate()))
        except ImportError:
            try:
                import torch
            except ImportError as err:
                raise BackendError("the TensorRT backend needs cuda-python (cuda-bindings) or torch") from err
            self._torch = torch
            self._torch_stream = torch.cuda.Stream()
            self.stream = int(self._torch_stream.cuda_stream)

    @staticmethod
    def _check(result: Any) -> Any:
        error, *values = result if isinstance(result, tuple) else (result,)
        if int(error) != 0:
            raise BackendError(f"CUDA call failed: {error}")
        return values[0] if values else None

    def alloc(self, nbytes: int) -> int:
        if self._cudart is not None:
            pointer = int(self._check(self._cudart.cudaMalloc(nbytes)))
            self._pointers.append(pointer)
            return pointer
        tensor = self._torch.empty(nbytes, dtype=self._torch.uint8, device="cuda")
        self._tensors[int(tensor.data_ptr())] = tensor
        return int(tensor.data_ptr())

    def to_device(self, pointer: int, host: np.ndarray) -> None:
        host_bytes = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
        if self._cudart is not None:
            kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._check(
                self._cudart.cudaMemcpyAsync(pointer, host_bytes.ctypes.data, host_bytes.nbytes, kind, self.stream)
            )
            return
        with self._torch.cuda.stream(self._torch_stream):
            self._tensors[pointer][: host_bytes.nbytes].copy_(self._torch.from_numpy(host_bytes))

    def to_host(self, host: np.ndarray, pointer: int) -> None:
        """Copy into ``host`` (C-contiguous); ordered after the work already queued on the stream."""
        host_bytes = host.reshape(-1).view(np.uint8)
        if self._cudart is not None:
            kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._check(
                self._cudart.cudaMemcpyAsync(host_bytes.ctypes.data, pointer, host_bytes.nbytes, kind, self.stream)
            )
            return
        with self._torch.cuda.stream(self._torch_stream):
            host_bytes[:] = self._tensors[pointer][: host_bytes.nbytes].cpu().numpy()

    def synchronize(self) -> None:
        if self._cudart is not None:
            self._check(self._cudart.cudaStreamSynchronize(self.stream))
        else:
            self._torch_stream.synchronize()

    def free(self) -> None:
        if self._cudart is not None:
            for pointer in self._pointers:
                self._cudart.cudaFree(pointer)
            self._cudart.cudaStreamDestroy(self.stream)
        self._pointers.clear()
        self._tensors.clear()


class TensorRTBackend(Backend):
    """A serialized TensorRT 10/11 engine from the bundle.

    Written against the TensorRT Python API (deserialize_cuda_engine, set_input_shape,
    set_tensor_address, execute_async_v3) but NOT exercised by this project's tests: TensorRT cannot
    be installed on the development and CI machines (line-side.md). It is only constructed when
    ``import tensorrt`` succeeds; test it on the target before relying on it.

    Buffers are allocated once for the engine's profile maximum batch and reused: a batch is copied
    in, run on one stream, and the three outputs are copied back.
    """

    def __init__(self, engine_path: str | Path, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        try:
            import tensorrt as trt
        except ImportError as err:
            raise BackendError("tensorrt is not installed") from err
        self._trt = trt
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._trt_logger)
        engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if engine is None:
            # The usual cause: the engine was built for another GPU or TensorRT version.
            raise BackendError(f"TensorRT could not deserialize {engine_path} (built for another GPU/TensorRT?)")
        self._engine = engine
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        missing = [n for n in (INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT, MAX_OUTPUT) if n not in names]
        if missing:
            raise BackendError(f"engine {engine_path} breaks the graph contract: missing tensors {missing}")
        input_shape = tuple(engine.get_tensor_shape(INPUT_NAME))
        if input_shape[0] == -1:
            _, _, profile_max = engine.get_tensor_profile_shape(INPUT_NAME, 0)
            engine_max = int(profile_max[0])
        else:
            engine_max = int(input_shape[0])
        self._fixed_batch = None if input_shape[0] == -1 else engine_max
        self.max_batch = min(max(1, max_batch), engine_max) if self._fixed_batch is None else engine_max
        self._image_shape = tuple(int(side) for side in input_shape[1:])
        self._memory = _CudaMemory()
        self._dtypes = {name: np.dtype(trt.nptype(engine.get_tensor_dtype(name))) for name in names}
        self._pointers: dict[str, int] = {}
        self._context.set_input_shape(INPUT_NAME, (self.max_batch, *self._image_shape))
        for name in (INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT, MAX_OUTPUT):
            shape = tuple(self._context.get_tensor_shape(name))
            nbytes = math.prod(shape) * self._dtypes[name].itemsize
            self._pointers[name] = self._memory.alloc(nbytes)
            self._context.set_tensor_address(name, self._pointers[name])
        self.name = "tensorrt"

    def _run_chunk(self, batch: np.ndarray) -> BackendOutputs:
        count = len(batch)
        batch = np.ascontiguousarray(pad_batch(batch, self._fixed_batch))
        run_batch = len(batch)
        self._context.set_input_shape(INPUT_NAME, (run_batch, *self._image_shape))
        self._memory.to_device(self._pointers[INPUT_NAME], batch)
        if not self._context.execute_async_v3(self._memory.stream):
            raise BackendError("TensorRT execute_async_v3 failed")
        results = []
        for name in (MAP_OUTPUT, SCORE_OUTPUT, MAX_OUTPUT):
            host = np.empty(tuple(self._context.get_tensor_shape(name)), dtype=self._dtypes[name])
            self._memory.to_host(host, self._pointers[name])
            results.append(host)
        self._memory.synchronize()
        maps, scores, maxes = (np.asarray(r, dtype=np.float32) for r in results)
        return maps[:count], scores.reshape(-1)[:count], maxes.reshape(-1)[:count]

    def close(self) -> None:
        self._memory.free()


def _model_files(bundle: Bundle, file_format: str, prefer_precision: str) -> list[str]:
    """Keys of the bundle's files of one format, the preferred precision first."""
    keys = [key for key, spec in bundle.manifest.files.items() if spec.format == file_format]
    keys.sort(key=lambda key: bundle.manifest.files[key].precision != prefer_precision)
    return keys


def _onnx_backend(
    bundle: Bundle, key: str, device: str, max_batch: int, intra_op_threads: int | None
) -> OnnxRuntimeBackend:
    """An ONNX Runtime session on a checked private copy of the model file and its external data.

    The copy is deleted once the session exists: ONNX Runtime has read the graph and mapped the
    external data by then, and an unlinked file cannot be changed by anyone.
    """
    with tempfile.TemporaryDirectory(prefix="llb-model-") as stage:
        path = stage_model_file(bundle, key, Path(stage))
        return OnnxRuntimeBackend(path, device=device, max_batch=max_batch, intra_op_threads=intra_op_threads)


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _openvino_importable() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _openvino_candidates(bundle: Bundle, with_fp32_graph: bool) -> list[tuple[str, str, str]]:
    """(reason to skip or "", bundle file key, precision) of the OpenVINO variants, usable ones fastest first.

    Gated variants built for this CPU and OpenVINO version come first, ordered by the speed
    measured when they were gated; then, ``with_fp32_graph``, the bundle's fp32 graph (no gate
    needed: full precision).
    """
    from llb_edge.runtime import openvino_backend as ov_backend

    cpu, version = ov_backend.detect_cpu(), ov_backend.openvino_version()
    variants: list[tuple[str, str, str, float]] = []
    for key, spec in bundle.manifest.files.items():
        if spec.format != ov_backend.FORMAT:
            continue
        reason = ov_backend.target_mismatch(spec.target, cpu, version) or ""
        if not reason and not spec.parity.get("passed"):
            reason = "its decision gate did not pass"
        speed = float(spec.target.get("ms_per_image") or math.inf)
        variants.append((reason, key, spec.precision, speed))
    variants.sort(key=lambda variant: (bool(variant[0]), variant[3]))
    fallback = [("", key, "fp32") for key in _model_files(bundle, "onnx", "fp32")[:1]] if with_fp32_graph else []
    return [(reason, key, precision) for reason, key, precision, _ in variants] + fallback


def _ort_cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def create_backend(
    bundle: Bundle,
    choice: str = "auto",
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    intra_op_threads: int | None = None,
) -> Backend:
    """The backend for ``bundle``: ``choice`` is auto, tensorrt, ort-cuda, openvino, ort-cpu, torch-cuda or torch-cpu.

    With auto, candidates are tried in speed order and the first that loads wins; an explicit
    choice fails with the reason instead of falling back, so a misconfigured GPU box is not
    quietly running on CPU.
    """
    if choice not in BACKEND_CHOICES:
        raise BackendError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {choice!r}")
    if choice in TORCH_BACKENDS:
        from llb_edge.runtime.torch_backend import create_torch_backend

        return create_torch_backend(bundle, choice.removeprefix("torch-"), max_batch=max_batch)
    candidates: list[tuple[str, str, str]] = []  # (backend, bundle file key, OpenVINO precision)
    failures: list[str] = []
    if choice in ("auto", "tensorrt") and (choice == "tensorrt" or _tensorrt_importable()):
        candidates += [("tensorrt", key, "") for key in _model_files(bundle, "tensorrt", "fp16")]
    if choice in ("auto", "ort-cuda") and (choice == "ort-cuda" or _ort_cuda_available()):
        candidates += [("ort-cuda", key, "") for key in _model_files(bundle, "onnx", "fp16")]
    if choice == "openvino" and not _openvino_importable():
        raise BackendError("backend openvino: OpenVINO is not installed here (pip install 'llb-edge[openvino]')")
    if choice in ("auto", "openvino") and _openvino_importable():
        for reason, key, precision in _openvino_candidates(bundle, with_fp32_graph=choice == "openvino"):
            if reason:  # built for another CPU or OpenVINO: log it, as a failed candidate
                path = bundle.manifest.files[key].path
                failures.append(f"openvino-{precision} {path}: {reason}")
                log_event(logger, logging.INFO, "backend_unavailable", backend=f"openvino-{precision}",
                          file=path, reason=reason)
            else:
                candidates.append(("openvino", key, precision))
    if choice in ("auto", "ort-cpu"):
        candidates += [("ort-cpu", key, "") for key in _model_files(bundle, "onnx", "fp32")]
    if not candidates:
        raise BackendError(f"bundle {bundle.root} has no model file usable by backend {choice!r}")
    for kind, key, precision in candidates:
        path = bundle.manifest.files[key].path
        try:
            if kind == "tensorrt":
                # Engines are deserialised into device memory: later edits of the file do not reach them.
                return TensorRTBackend(confined_path(bundle.root, path), max_batch=max_batch)
            if kind == "openvino":
                from llb_edge.runtime.openvino_backend import OpenVinoBackend

                return OpenVinoBackend(confined_path(bundle.root, path), precision=precision, max_batch=max_batch,
                                       threads=intra_op_threads)
            device = "cuda" if kind == "ort-cuda" else "cpu"
            return _onnx_backend(bundle, key, device, max_batch, intra_op_threads)
        except BackendError as err:
            failures.append(f"{kind} {path}: {err}")
            log_event(logger, logging.WARNING, "backend_unavailable", backend=kind, file=path, reason=str(err))
    raise BackendError("no backend could load the bundle: " + "; ".join(failures))


def self_check(backend: Backend, crop: int, map_size: int) -> None:
    """Run a small test batch and check output shapes and finiteness; raises BackendError.

    Run on every load and before a hot reload swaps models: a model that loads but returns NaN
    (a broken FP16 engine, a truncated file with a valid checksum) must never reach the line.
    """
    rng = np.random.default_rng(0)
    batch_size = min(2, backend.max_batch)
    batch = rng.integers(0, 256, size=(batch_size, crop, crop, 3), dtype=np.uint8)
    try:
        maps, scores, maxes = backend.run(batch)
    except BackendError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of a test batch refuses the model
        raise BackendError(f"self-check batch failed: {err}") from err
    expected = (batch_size, 1, map_size, map_size)
    if maps.shape != expected or scores.shape != (batch_size,) or maxes.shape != (batch_size,):
        raise BackendError(
            f"self-check: outputs {maps.shape}, {scores.shape}, {maxes.shape}; expected map {expected}, "
            f"scores ({batch_size},)"
        )
    for name, values in (("anomaly_map", maps), ("score", scores), ("score_max", maxes)):
        if not np.all(np.isfinite(values)):
            raise BackendError(f"self-check: {name} has non-finite values")
