"""torch -> ONNX for the deployable graph (``InspectionModel``), fp32 and fp16.

Graph contract (llb_edge.bundle, docs/bundle.md): input ``images`` uint8 [batch, H, W, 3] RGB at
the model's input size, normalisation inside the graph; outputs ``anomaly_map`` float32
[batch, 1, M, M], ``score`` float32 [batch] (top-1% mean via TopK) and ``score_max`` float32
[batch]. Only the batch axis is dynamic.

Exporter choice: torch 2.14's ``torch.export``-based exporter (``dynamo=True``). Compared with the
legacy TorchScript exporter it gives half the nodes (its optimizer folds the shape arithmetic),
and static map dimensions on the outputs; the legacy exporter labelled the map's spatial axes as
dynamic, which the lint (rightly) refuses. The price is time: 15-30 s per export on two shared CPU cores.

fp16 is exported from a mixed-precision copy of the model, not by converting the fp32 graph:
the bulk of the work (encoder and decoder matmuls, MLPs, convolution) runs in float16, while the
parts that overflow or lose their meaning in float16 stay float32, with explicit Casts:

- the uint8 -> float normalisation (exact in float32);
- every LayerNorm: DINOv2's residual stream has tokens with norms in the hundreds, whose squares
  overflow float16 (the FP16-ViT accuracy loss of NVIDIA/TensorRT #3893);
- the decoder's linear attention: ``sum_s phi(k_s)`` over ~800 tokens and ``phi(q) . k_sum``
  exceed float16's 65504 easily;
- the scorer: ``1 - cos`` of near-parallel features cancels catastrophically in float16 (its
  resolution near 1 is 5e-4, the size of the signal), so cosine, resizes, blur and TopK are float32.

A strongly typed TensorRT build (TensorRT 11, or 10 with STRONGLY_TYPED) honours these Casts.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from llb_edge.bundle import INPUT_NAME, MAP_OUTPUT, MAX_OUTPUT, ONNX_PRECISIONS, SCORE_OUTPUT
from llb_edge.errors import LLBEdgeError
from llb_edge.models.dinomaly import AnomalyScorer, InspectionModel, LinearAttention

log = logging.getLogger(__name__)

OPSET = 18  # LayerNormalization needs 17; the torch.export-based exporter emits 18 natively
BATCH_DIM = "batch"
# The example batch used for tracing: 2, because torch.export specialises sizes 0 and 1.
EXAMPLE_BATCH = 2


# The exporter's graph passes log every rewrite at INFO (thousands of lines per export).
_CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._export")


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in _CHATTY_LOGGERS}
    try:
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


class ExportError(LLBEdgeError, RuntimeError):
    """An export that cannot produce a graph honouring the bundle contract."""


@dataclass
class OnnxExport:
    """One exported ONNX graph and how the export went (bundle.json records ``to_dict()``)."""

    path: Path
    precision: str
    opset: int
    seconds: float
    nodes: int
    op_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "opset": self.opset, "export_seconds": round(self.seconds, 2),
                "nodes": self.nodes, "op_counts": self.op_counts}


class _FloatInput(nn.Module):
    """Casts the uint8 NHWC input to float32 before the model sees it.

    ``normalize_uint8_nhwc`` permutes before casting, which puts a Transpose on a UINT8 tensor;
    TensorRT only accepts UINT8 at the network boundary (it must be converted first). The cast
    is exact, so the graph computes the same numbers.
    """

    def __init__(self, inner: InspectionModel) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inner(images.to(torch.float32))


class _Float32Island(nn.Module):
    """Runs ``inner`` (kept in float32) on a float32 copy of its input, returns the input dtype."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float()).to(x.dtype)


class _CastInput(nn.Module):
    """Casts the input to ``dtype`` before ``inner``: the float32 -> float16 entry of the encoder."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype))


class _Float32Scorer(nn.Module):
    """The scorer on float32 copies of the group features (see the module docstring)."""

    def __init__(self, inner: AnomalyScorer) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self, enc_groups: list[torch.Tensor], dec_groups: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inner([g.float() for g in enc_groups], [g.float() for g in dec_groups])


def _wrap_float32_islands(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.LayerNorm | LinearAttention):
            setattr(module, name, _Float32Island(child))
        else:
            _wrap_float32_islands(child)


def mixed_fp16_model(model: InspectionModel) -> InspectionModel:
    """A float16 copy of ``model`` with float32 islands (module docstring); ``model`` is untouched.

    Same inputs and outputs: uint8 images in, float32 map and scores out.
    """
    mixed = copy.deepcopy(model).eval()
    _wrap_float32_islands(mixed.model)
    mixed.model.half()
    for module in mixed.model.modules():
        if isinstance(module, _Float32Island):
            module.inner.float()
    encoder = mixed.model.encoder
    encoder.patch_proj = _CastInput(encoder.patch_proj, torch.float16)
    mixed.scorer = _Float32Scorer(mixed.scorer.float())  # type: ignore[assignment]
    return mixed


def deployable_module(model: InspectionModel, precision: str) -> nn.Module:
    """The module that is exported for ``precision`` (also what parity tests may run in torch)."""
    if precision not in ONNX_PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(ONNX_PRECISIONS)}, got {precision!r}")
    model = model.eval()
    inner = model if precision == "fp32" else mixed_fp16_model(model)
    return _FloatInput(inner).eval()


def _model_geometry(model: InspectionModel) -> tuple[int, int]:
    return int(model.scorer.input_size), int(model.scorer.map_size)


def check_contract(proto: onnx.ModelProto, input_size: int, map_size: int) -> None:
    """Raise ExportError unless the graph's I/O names, types and shapes follow the bundle contract."""
    def dims(value: onnx.ValueInfoProto) -> list[Any]:
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: v for v in proto.graph.input}
    outputs = {v.name: v for v in proto.graph.output}
    problems: list[str] = []
    if list(inputs) != [INPUT_NAME]:
        problems.append(f"inputs are {list(inputs)}, expected [{INPUT_NAME!r}]")
    else:
        value = inputs[INPUT_NAME]
        if value.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
            problems.append(f"{INPUT_NAME} is not uint8")
        shape = dims(value)
        if len(shape) != 4 or shape[1:] != [input_size, input_size, 3] or isinstance(shape[0], int):
            problems.append(f"{INPUT_NAME} shape {shape}, expected [batch, {input_size}, {input_size}, 3]")
    expected = {MAP_OUTPUT: [1, map_size, map_size], SCORE_OUTPUT: [], MAX_OUTPUT: []}
    if sorted(outputs) != sorted(expected):
        problems.append(f"outputs are {sorted(outputs)}, expected {sorted(expected)}")
    else:
        for name, tail in expected.items():
            value = outputs[name]
            if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
                problems.append(f"{name} is not float32")
            shape = dims(value)
            if len(shape) != 1 + len(tail) or shape[1:] != tail or isinstance(shape[0], int):
                problems.append(f"{name} shape {shape}, expected [batch, {', '.join(map(str, tail))}]".replace(
                    ", ]", "]"))
    if problems:
        raise ExportError("exported graph breaks the bundle contract: " + "; ".join(problems))


def export_onnx(
    model: InspectionModel,
    path: str | Path,
    precision: str = "fp32",
    opset: int = OPSET,
    metadata: dict[str, str] | None = None,
) -> OnnxExport:
    """Export ``model`` to ``path`` as one self-contained .onnx file; checks the result.

    Runs ``onnx.checker`` (full check, i.e. strict shape inference) and the contract check. The
    TensorRT lint and the parity gate are the caller's next steps (see bundle_export).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_size, map_size = _model_geometry(model)
    module = deployable_module(model, precision)
    example = torch.zeros((EXAMPLE_BATCH, input_size, input_size, 3), dtype=torch.uint8)
    batch = torch.export.Dim(BATCH_DIM, min=1)
    started = time.perf_counter()
    with warnings.catch_warnings(), _quiet_exporter_logs():
        # The exporter warns about things that do not apply here (e.g. deprecated internals).
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[MAP_OUTPUT, SCORE_OUTPUT, MAX_OUTPUT],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes={"images": {0: batch}},
                optimize=True,
                verbose=False,
            )
        except Exception as err:  # noqa: BLE001 - the exporter raises many kinds; wrap with context
            raise ExportError(f"torch.onnx.export failed for the {precision} model: {err}") from err
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    seconds = time.perf_counter() - started
    if precision == "fp32" and any(
        t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer
    ):
        raise ExportError("the fp32 export contains float16 weights; was the model converted in place?")
    proto.doc_string = "llb-edge inspection graph: uint8 NHWC images -> anomaly_map, score, score_max"
    for key, value in {"llb_edge.precision": precision, **(metadata or {})}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save_model(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"onnx.checker rejects {path}: {err}") from err
    check_contract(proto, input_size, map_size)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    log.info("exported %s (%s, opset %d, %d nodes) in %.1f s", path, precision, opset, len(proto.graph.node),
             seconds)
    return OnnxExport(path=path, precision=precision, opset=opset, seconds=seconds, nodes=len(proto.graph.node),
                      op_counts=dict(sorted(counts.items())))
