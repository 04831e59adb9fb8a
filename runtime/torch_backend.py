"""The torch backend: `llb-edge serve --backend torch-cuda` for GPU servers without TensorRT or onnxruntime-gpu.

It runs the trained InspectionModel itself (llb_edge.models.dinomaly), not the ONNX graph:

- weights: a safetensors copy inside the bundle (files key ``torch-fp32``, hashed and verified like
  every bundle file; `llb-edge bundle add-torch-weights` writes it), else the run the bundle was
  exported from (``source_run``), whose ``model.safetensors`` must still have the sha256 the export
  recorded (``extra.trained_weights_sha256``);
- frames go to the device as uint8 and are normalised there (``normalize_uint8_nhwc``'s arithmetic),
  so a 392 px batch crosses PCIe at a quarter of the float32 size;
- on CUDA the encoder and decoder run under bf16 (or fp16) autocast; the scorer (``1 - cos`` of
  near-parallel features, resizes, blur, TopK) stays float32, as in the fp16 ONNX graph;
- on CUDA one CUDA graph is captured per batch bucket (powers of two up to ``max_batch``, and
  ``max_batch``) into static input/output buffers sharing one memory pool; a batch is padded to its
  bucket and the graph replayed, which removes the per-kernel launch cost that dominates small
  batches. ``mode="compile"`` uses torch.compile instead, ``mode="eager"`` neither;
- on CPU (tests, and checking a bundle's weights without a GPU: ``--backend torch-cpu``) it runs
  eagerly in float32: neither graphs nor bf16 autocast help there.

Before it is returned it passes the bundle's parity gate (exporters/parity.py): its outputs on the
bundle's parity images against ONNX Runtime on the bundle's fp32 graph, with the fp16 tolerances
for half-precision autocast and the fp32 ones for float32. With ``precision="auto"`` a failed gate
tries the next precision (bf16, fp16, fp32), each failure logged; an explicit precision fails.

torch is imported here only; llb_edge.runtime.backends imports this module when a torch backend is
chosen, so the runtime without torch is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llb_edge.bundle import (
    Bundle,
    BundleError,
    ModelFile,
    confined_path,
    load_bundle,
    save_and_reload,
    sha256_file,
)
from llb_edge.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from llb_edge.runtime.backends import DEFAULT_MAX_BATCH, Backend, BackendError, BackendOutputs
from llb_edge.runtime.logs import get_logger, log_event

if TYPE_CHECKING:
    import torch

    from llb_edge.models.dinomaly import InspectionModel

TORCH_WEIGHTS_KEY = "torch-fp32"
TORCH_WEIGHTS_FILE = "model_torch_fp32.safetensors"
TORCH_WEIGHTS_FORMAT = "safetensors"
MODES = ("graphs", "compile", "eager")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Tried in this order with precision="auto" on CUDA: bf16 keeps fp32's range (no overflow of
# DINOv2's large token norms), fp16 has 3 more mantissa bits, fp32 always reproduces the graph.
AUTO_CUDA_PRECISIONS = ("bf16", "fp16", "fp32")
WARMUP_RUNS = 3  # eager runs before a capture: cuDNN/cuBLAS pick their kernels outside the graph

logger = get_logger("torch_backend")


# ------------------------------------------------------------------------------ the weights file


def save_inspection_weights(model: InspectionModel, path: str | Path, encoder: str) -> Path:
    """Every parameter and buffer of ``model`` (the resampled position embedding included) as safetensors.

    The header metadata records what rebuilds the architecture, so the file alone serves a model.
    """
    from safetensors.torch import save_file

    scorer = model.scorer
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in (*model.named_parameters(),
                                                                       *model.named_buffers())}
    metadata = {
        "encoder": encoder,
        "input_size": str(scorer.input_size),
        "map_size": str(scorer.map_size),
        "top_k": str(scorer.top_k),
        "gaussian_kernel": str(int(scorer.kernel.shape[-1])),
    }
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def load_inspection_weights(path: str | Path) -> InspectionModel:
    """The InspectionModel saved by :func:`save_inspection_weights` (on CPU, eval mode)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from llb_edge.models.dinomaly import AnomalyScorer, InspectionModel, create_dinomaly

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    try:
        encoder, input_size = metadata["encoder"], int(metadata["input_size"])
        map_size, top_k = int(metadata["map_size"]), int(metadata["top_k"])
        kernel = int(metadata["gaussian_kernel"])
    except (KeyError, ValueError) as err:
        raise BackendError(f"{path} is not an llb-edge torch weights file (header metadata: {err})") from err
    # Architecture only: every tensor is overwritten below, the random init is never used.
    dinomaly, _ = create_dinomaly(encoder, input_size, "random")
    # top_fraction only sets top_k, which the header records exactly; sigma lives in the saved kernel.
    scorer = AnomalyScorer(input_size, map_size, kernel_size=kernel, top_fraction=top_k / (map_size * map_size))
    scorer.top_k = top_k
    model = InspectionModel(dinomaly, scorer)
    saved = load_file(str(path))
    targets = dict((*model.named_parameters(), *model.named_buffers()))
    missing, unexpected = sorted(set(targets) - set(saved)), sorted(set(saved) - set(targets))
    if missing or unexpected:
        raise BackendError(f"{path} does not match the {encoder} architecture: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, target in targets.items():
            if saved[name].shape != target.shape:
                raise BackendError(f"{path}: {name} has shape {tuple(saved[name].shape)}, the architecture "
                                   f"{tuple(target.shape)}")
            target.copy_(saved[name])
    return model.eval()


def add_torch_weights(bundle_dir: str | Path, weights: str | None = None) -> Bundle:
    """Write the source run's model into the bundle as ``model_torch_fp32.safetensors`` (files key ``torch-fp32``).

    For line servers that serve with ``--backend torch-cuda`` without the training run. The run
    must be the one exported (sha256 checked); ``weights``: its backbone file when the recorded
    path does not exist here.
    """
    bundle = load_bundle(bundle_dir)
    model = _model_from_run(bundle, weights)
    path = save_inspection_weights(model, bundle.root / TORCH_WEIGHTS_FILE, bundle.manifest.encoder)
    bundle.manifest.files[TORCH_WEIGHTS_KEY] = ModelFile(path=TORCH_WEIGHTS_FILE, sha256=sha256_file(path),
                                                        format=TORCH_WEIGHTS_FORMAT, precision="fp32")
    return save_and_reload(bundle)


def _model_from_run(bundle: Bundle, weights: str | None = None) -> InspectionModel:
    from llb_edge.runs import MODEL, RunError, load_inspection_model

    run_dir = Path(bundle.manifest.source_run)
    trained = run_dir / MODEL
    if not trained.is_file():
        raise BackendError(f"bundle {bundle.root} holds no torch weights ({TORCH_WEIGHTS_KEY}) and its source run "
                           f"{run_dir} is not here; add them where the run is: llb-edge bundle add-torch-weights")
    expected = bundle.trained_weights_sha256
    if not expected or sha256_file(trained) != expected:
        raise BackendError(f"{trained} is not the model this bundle was exported from (sha256 "
                           f"{expected or 'not recorded'}); re-export the bundle from the run")
    try:
        model, _, _ = load_inspection_model(run_dir, "cpu", weights)
    except RunError as err:
        raise BackendError(f"cannot rebuild the bundle's model from {run_dir}: {err}") from err
    return model


def bundle_inspection_model(bundle: Bundle) -> tuple[InspectionModel, str]:
    """(model on CPU, where it came from): the bundle's torch weights file, else its source run."""
    spec = bundle.manifest.files.get(TORCH_WEIGHTS_KEY)
    if spec is not None:
        return load_inspection_weights(confined_path(bundle.root, spec.path)), spec.path
    return _model_from_run(bundle), bundle.manifest.source_run


# ------------------------------------------------------------------------------------- the backend


@dataclass
class _CapturedBatch:
    """One CUDA graph and the static buffers it reads and writes."""

    graph: Any  # torch.cuda.CUDAGraph
    images: torch.Tensor  # uint8 [bucket, H, W, 3] on the device: copy a batch in, then replay
    staging: torch.Tensor  # the same shape in pinned host memory: host -> device without a bounce
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes captured: powers of two below ``max_batch``, and ``max_batch``.

    A batch pads to the next bucket: at most 2x the work for a rare odd size, against one graph
    (and its capture time and memory) per size.
    """
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


class TorchBackend(Backend):
    """An InspectionModel on a torch device; see the module docstring. Not thread-safe (one caller)."""

    def __init__(
        self,
        model: InspectionModel,
        *,
        device: str = "cuda",
        precision: str = "fp32",
        max_batch: int = DEFAULT_MAX_BATCH,
        mode: str = "graphs",
    ) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        if precision not in PRECISIONS[1:]:
            raise BackendError(f"precision must be one of {', '.join(PRECISIONS[1:])}, got {precision!r}")
        if mode not in MODES:
            raise BackendError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        on_cuda = self.device.type == "cuda"
        if not on_cuda and precision != "fp32":
            raise BackendError(f"{precision} autocast is for CUDA; on {self.device.type} the torch backend runs fp32")
        if on_cuda and precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise BackendError(f"{torch.cuda.get_device_name(self.device)} has no bf16; use fp16")
        self.precision = precision
        self.mode = mode if on_cuda else "eager"  # graphs are CUDA-only; compile brings nothing to tests
        self.max_batch = max(1, max_batch)
        self.name = f"torch-{self.device.type}"
        self._model = model.to(self.device).eval()
        self._input_size = int(model.scorer.input_size)
        self._autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # normalize_uint8_nhwc's arithmetic with its constants made once on the device: it builds
        # them per call from Python lists, a host-to-device copy that CUDA graph capture forbids.
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._forward_fn = self._forward
        self._graphs: dict[int, _CapturedBatch] = {}
        if self.mode == "compile":
            # Static shapes: one specialisation per bucket, like the graphs; batches pad to a bucket.
            self._forward_fn = torch.compile(self._forward, dynamic=False)
        if self.mode in ("graphs", "compile"):
            self._buckets = batch_buckets(self.max_batch)
        if self.mode == "graphs":
            self._pool = torch.cuda.graph_pool_handle()
            for bucket in self._buckets:
                self._graphs[bucket] = self._capture(bucket)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 images already on the device -> (map, score, max), float32."""
        torch = self._torch
        x = (images.to(torch.float32).permute(0, 3, 1, 2) / 255.0 - self._mean) / self._std
        # cache_enabled=False: autocast's cast-weight cache must be off inside CUDA graph capture.
        autocast = (torch.autocast(self.device.type, dtype=self._autocast_dtype, cache_enabled=False)
                    if self._autocast_dtype else contextlib.nullcontext())
        with autocast:
            enc_groups, dec_groups = self._model.model(x)
        return self._model.scorer([g.float() for g in enc_groups], [g.float() for g in dec_groups])

    def _capture(self, bucket: int) -> _CapturedBatch:
        torch = self._torch
        size = self._input_size
        images = torch.zeros((bucket, size, size, 3), dtype=torch.uint8, device=self.device)
        staging = torch.empty((bucket, size, size, 3), dtype=torch.uint8, pin_memory=True)
        # Warm up on a side stream (as torch.cuda.graph requires), so lazy initialisation and
        # kernel selection happen outside the capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(WARMUP_RUNS):
                self._forward(images)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool):
            outputs = self._forward(images)
        return _CapturedBatch(graph=graph, images=images, staging=staging, outputs=outputs)

    def _bucket(self, count: int) -> int:
        return next(size for size in self._buckets if size >= count)

    def _run_chunk(self, batch: np.ndarray) -> BackendOutputs:
        torch = self._torch
        count = len(batch)
        host = torch.from_numpy(np.ascontiguousarray(batch))
        if self.mode == "graphs":
            captured = self._graphs[self._bucket(count)]
            captured.staging[:count].copy_(host)
            captured.images[:count].copy_(captured.staging[:count], non_blocking=True)
            captured.graph.replay()
            outputs = captured.outputs
        else:
            if self.mode == "compile":
                bucket = self._bucket(count)
                if bucket > count:
                    host = torch.cat([host, host.new_zeros((bucket - count, *host.shape[1:]))])
            with torch.no_grad():
                outputs = self._forward_fn(host.to(self.device, non_blocking=True))
        maps, scores, maxes = (o[:count].float().cpu().numpy() for o in outputs)  # .cpu() waits for the stream
        return maps, scores.reshape(-1), maxes.reshape(-1)

    def close(self) -> None:
        self._graphs.clear()
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ creation


def _parity_tolerance_name(precision: str) -> str:
    """Half-precision autocast is held to the fp16 file's bounds, float32 to the fp32 file's."""
    return "fp32" if precision == "fp32" else "fp16"


def gate(backend: TorchBackend, bundle: Bundle) -> None:
    """The bundle's parity gate: ``backend`` against ONNX Runtime fp32 on the parity images; raises ParityError."""
    from llb_edge.exporters import parity
    from llb_edge.exporters.bundle_export import bundle_parity_images

    graphs = [spec for spec in bundle.manifest.files.values() if spec.format == "onnx" and spec.precision == "fp32"]
    if not graphs:
        raise BackendError(f"bundle {bundle.root} has no fp32 ONNX graph to hold the torch backend against")
    report = parity.check_backend_parity(
        bundle.root / graphs[0].path, bundle_parity_images(bundle), backend.run,
        _parity_tolerance_name(backend.precision), candidate_name=f"{backend.name}-{backend.precision}",
    )
    log_event(logger, logging.INFO, "parity", backend=backend.name, precision=backend.precision,
              mode=backend.mode, **report.to_dict())
    parity.require(report)


def create_torch_backend(
    bundle: Bundle,
    device: str = "cuda",
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    precision: str = "auto",
    mode: str = "graphs",
) -> TorchBackend:
    """The bundle's model on ``device`` (cuda | cpu), parity-gated against ONNX Runtime fp32; raises BackendError."""
    try:
        import torch
    except ImportError as err:
        raise BackendError("the torch backends need torch (pip install 'llb-edge[train]')") from err
    from llb_edge.exporters.parity import ParityError

    if device not in ("cuda", "cpu"):
        raise BackendError(f"device must be cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"torch {torch.__version__} sees no CUDA GPU here; use another backend")
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        candidates = list(AUTO_CUDA_PRECISIONS) if device == "cuda" else ["fp32"]
        if device == "cuda" and not torch.cuda.is_bf16_supported():
            candidates.remove("bf16")
    else:
        candidates = [precision]
    try:
        model, source = bundle_inspection_model(bundle)
    except BundleError as err:
        raise BackendError(str(err)) from err
    failures = []
    for candidate in candidates:
        backend = TorchBackend(model, device=device, precision=candidate, max_batch=max_batch, mode=mode)
        try:
            gate(backend, bundle)
        except (ParityError, BundleError) as err:
            backend.close()
            failures.append(f"{candidate}: {err}")
            log_event(logger, logging.WARNING, "backend_unavailable", backend=backend.name, precision=candidate,
                      reason=str(err))
            continue
        log_event(logger, logging.INFO, "torch_backend", backend=backend.name, precision=candidate, mode=backend.mode,
                  weights=source, torch=torch.__version__)
        return backend
    raise BackendError(f"the torch backend failed the parity gate: {'; '.join(failures)}")
