"""A TensorRT-compatibility lint for exported ONNX graphs, runnable without TensorRT.

TensorRT cannot be installed on the development and CI machines (line-side.md), so a graph that
TensorRT's ONNX parser would reject is only discovered on the line PC, at engine build time. This
lint catches the known traps here instead. Its rules come from the ONNX-TensorRT operator support
matrix for TensorRT 10 (docs/operators.md of onnx/onnx-tensorrt) plus this project's graph
contract (docs/bundle.md):

- only operators TensorRT 10 imports, from the default ONNX domain (no custom ops);
- opset inside the range both TensorRT 10 and this project accept;
- TopK with a constant K <= 3840 and ``sorted=1`` (Dinomaly's full sort exported as TopK
  K=65536 is the classic failure);
- no Einsum (equations with an ellipsis do not convert; the model is written without any);
- Resize without antialiasing, with a supported mode, coordinate transform and aspect policy;
- axes/K/pads inputs that TensorRT needs as build-time constants are constants;
- UINT8 only on network inputs/outputs, no tensor types TensorRT lacks;
- dynamic dimensions only on the batch axis of the graph inputs and outputs.

Every check returns :class:`Finding` records; ``error`` findings make an export fail.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from llb_edge.errors import LLBEdgeError

ERROR = "error"
WARNING = "warning"

# TensorRT's ITopKLayer limit; Dinomaly's score uses K = 1% of the map (655 at 256 x 256).
TOPK_MAX_K = 3840
# ONNX-TensorRT 10.x imports opsets 9..20; LayerNormalization (one fused normalisation layer,
# which keeps FP16 engines accurate) needs 17. Graphs outside this range are refused here.
MIN_OPSET = 17
MAX_OPSET = 20

# Operators the ONNX-TensorRT 10 parser imports (its support matrix, "Y" rows). Ops that are
# supported but banned by this project (Einsum) are still listed: they get their own finding.
TENSORRT_OPS: frozenset[str] = frozenset(
    [
        "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
        "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape",
        "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace", "DequantizeLinear", "Div",
        "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather",
        "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater",
        "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Hardmax", "Identity",
        "If", "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less",
        "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "Max",
        "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression",
        "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear",
        "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1",
        "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
        "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign", "Round",
        "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign",
        "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze",
        "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample",
        "Where", "Xor",
    ]
)

# Inputs TensorRT needs as build-time constants (initializers or Constant nodes), by op type:
# {op: {input index: what it is}}. Reduce* take axes as input 1 from opset 18 (ReduceSum from 13).
CONSTANT_INPUTS: dict[str, dict[int, str]] = {
    **{
        op: {1: "axes"}
        for op in (
            "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
            "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze",
        )
    },
    "Slice": {3: "axes"},
    "Pad": {3: "axes"},
    "CumSum": {1: "axis"},
    "TopK": {1: "K"},
}

RESIZE_MODES = frozenset({"nearest", "linear"})
RESIZE_COORDINATE_MODES = frozenset(
    {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
)
RESIZE_NEAREST_MODES = frozenset({"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"})

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})
INDEX_TYPES = frozenset({TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL})
# TensorRT treats these as quantized types: only valid around Q/DQ nodes, which this model has none of.
QUANTIZED_TYPES = frozenset({TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4})


@dataclass(frozen=True)
class Finding:
    level: str  # error | warning
    code: str  # short stable identifier, e.g. "topk-k", for tests and for grepping logs
    message: str
    node: str = ""  # node name (or tensor name) the finding is about

    def __str__(self) -> str:
        where = f" [{self.node}]" if self.node else ""
        return f"{self.level} {self.code}{where}: {self.message}"


class LintError(LLBEdgeError, RuntimeError):
    """A graph with error-level findings; ``findings`` holds all of them (warnings included)."""

    def __init__(self, findings: list[Finding], source: str = "model") -> None:
        self.findings = findings
        errors = [f for f in findings if f.level == ERROR]
        shown = "\n  ".join(str(f) for f in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        super().__init__(f"{source} fails the TensorRT lint with {len(errors)} error(s):\n  {shown}{more}")


def errors(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == ERROR]


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    values: dict[str, object] = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        values[attr.name] = value.decode() if isinstance(value, bytes) else value
    return values


class _Constants:
    """Resolves a tensor name to its value when it is a build-time constant.

    Covers initializers, Constant nodes and Identity chains of those: the shapes exporters emit.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._initializers = {t.name: t for t in graph.initializer}
        self._producers = {out: node for node in graph.node for out in node.output if out}

    def is_constant(self, name: str) -> bool:
        return self.value(name) is not None

    def value(self, name: str, depth: int = 0) -> np.ndarray | None:
        if name in self._initializers:
            return numpy_helper.to_array(self._initializers[name])
        node = self._producers.get(name)
        if node is None or depth > 8:
            return None
        if node.op_type == "Constant":
            attrs = _attributes(node)
            if "value" in attrs:
                return numpy_helper.to_array(attrs["value"])  # type: ignore[arg-type]
            for key in ("value_int", "value_float"):
                if key in attrs:
                    return np.asarray(attrs[key])
            for key in ("value_ints", "value_floats"):
                if key in attrs:
                    return np.asarray(attrs[key])
            return None
        if node.op_type == "Identity":
            return self.value(node.input[0], depth + 1)
        return None


def _check_opsets(model: onnx.ModelProto, min_opset: int, max_opset: int) -> list[Finding]:
    findings: list[Finding] = []
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        findings.append(Finding(ERROR, "opset", "the model imports no default-domain opset"))
    elif not min_opset <= default[0] <= max_opset:
        findings.append(
            Finding(ERROR, "opset", f"opset {default[0]} is outside the supported range {min_opset}..{max_opset}")
        )
    return findings


def _check_io(model: onnx.ModelProto) -> list[Finding]:
    """Only the batch axis (dim 0) of graph inputs and outputs may be dynamic.

    A dynamic spatial or map dimension forces an optimisation profile over image sizes and breaks
    the fixed input size of the bundle contract; an unknown rank breaks the TensorRT bindings.
    """
    findings: list[Finding] = []
    initializer_names = {t.name for t in model.graph.initializer}
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            if value.name in initializer_names:
                continue  # old-style graphs list initializers as inputs; they are not bindings
            tensor_type = value.type.tensor_type
            if not tensor_type.HasField("shape"):
                findings.append(Finding(ERROR, "io-shape", f"graph {kind} has no static rank", value.name))
                continue
            for axis, dim in enumerate(tensor_type.shape.dim):
                if axis == 0:
                    continue
                if not dim.HasField("dim_value") or dim.dim_value <= 0:
                    label = dim.dim_param or "unknown"
                    findings.append(
                        Finding(
                            ERROR, "dynamic-dim",
                            f"graph {kind} axis {axis} is dynamic ({label}); only the batch axis may be",
                            value.name,
                        )
                    )
    return findings


def _check_types(model: onnx.ModelProto) -> list[Finding]:
    """Tensor element types TensorRT cannot hold; UINT8 is allowed only for network I/O."""
    findings: list[Finding] = []
    graph = model.graph
    io_names = {v.name for v in graph.input} | {v.name for v in graph.output}
    typed = [*graph.value_info, *graph.input, *graph.output]
    for value in typed:
        elem = value.type.tensor_type.elem_type
        if elem == TensorProto.UNDEFINED or elem in FLOAT_TYPES or elem in INDEX_TYPES:
            continue
        type_name = TensorProto.DataType.Name(elem)
        if elem == TensorProto.UINT8:
            if value.name not in io_names:
                findings.append(
                    Finding(ERROR, "dtype", "UINT8 tensors are only supported as network inputs/outputs", value.name)
                )
        elif elem == TensorProto.DOUBLE:
            findings.append(
                Finding(WARNING, "dtype", "DOUBLE is cast down to FLOAT by TensorRT (values clamped)", value.name)
            )
        elif elem in QUANTIZED_TYPES:
            findings.append(Finding(ERROR, "dtype", f"{type_name} needs explicit Q/DQ quantization", value.name))
        else:
            findings.append(Finding(ERROR, "dtype", f"TensorRT has no {type_name} tensors", value.name))
    for tensor in graph.initializer:
        if tensor.data_type not in FLOAT_TYPES | INDEX_TYPES and tensor.data_type != TensorProto.DOUBLE:
            name = TensorProto.DataType.Name(tensor.data_type)
            findings.append(Finding(ERROR, "dtype", f"initializer of type {name}", tensor.name))
    return findings


def _check_topk(node: onnx.NodeProto, label: str, constants: _Constants, max_k: int) -> list[Finding]:
    findings: list[Finding] = []
    attrs = _attributes(node)
    if attrs.get("sorted", 1) != 1:
        findings.append(Finding(ERROR, "topk-sorted", "TensorRT requires TopK sorted=1", label))
    if len(node.input) < 2:  # opset < 10 kept K as an attribute
        k_value: np.ndarray | None = np.asarray(attrs.get("k", 0))
    else:
        k_value = constants.value(node.input[1])
    if k_value is None:
        findings.append(Finding(ERROR, "topk-k", "TopK K must be a build-time constant for TensorRT", label))
    elif int(np.max(k_value)) > max_k:
        findings.append(
            Finding(
                ERROR, "topk-k",
                f"TopK K={int(np.max(k_value))} exceeds TensorRT's limit of {max_k}; "
                "score with a smaller top fraction or a smaller map",
                label,
            )
        )
    return findings


def _check_resize(node: onnx.NodeProto, label: str) -> list[Finding]:
    findings: list[Finding] = []
    attrs = _attributes(node)
    if attrs.get("antialias", 0) != 0:
        findings.append(
            Finding(
                ERROR, "resize-antialias",
                "antialiased Resize is not supported by TensorRT (precompute it, e.g. the position embedding)",
                label,
            )
        )
    mode = attrs.get("mode", "nearest")
    if mode not in RESIZE_MODES:
        findings.append(Finding(ERROR, "resize-mode", f"Resize mode {mode!r} is not supported", label))
    coordinate = attrs.get("coordinate_transformation_mode", "half_pixel")
    if coordinate not in RESIZE_COORDINATE_MODES:
        findings.append(
            Finding(ERROR, "resize-coordinates", f"coordinate_transformation_mode {coordinate!r} is not supported",
                    label)
        )
    if mode == "nearest" and attrs.get("nearest_mode", "round_prefer_floor") not in RESIZE_NEAREST_MODES:
        findings.append(Finding(ERROR, "resize-nearest", f"nearest_mode {attrs['nearest_mode']!r}", label))
    if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        findings.append(
            Finding(ERROR, "resize-aspect", "only keep_aspect_ratio_policy='stretch' is supported", label)
        )
    if attrs.get("exclude_outside", 0) != 0:
        findings.append(Finding(WARNING, "resize-exclude", "exclude_outside=1 may be ignored by TensorRT", label))
    return findings


def _check_node(
    node: onnx.NodeProto, label: str, constants: _Constants, used: set[str], max_k: int
) -> list[Finding]:
    findings: list[Finding] = []
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return [Finding(ERROR, "custom-op", f"{node.domain}::{op} is not a standard ONNX operator", label)]
    if op == "Einsum":
        equation = str(_attributes(node).get("equation", ""))
        findings.append(
            Finding(
                ERROR, "einsum",
                f"Einsum ({equation!r}) is not allowed: ellipsis equations do not convert to TensorRT; "
                "write it with MatMul/Reshape",
                label,
            )
        )
        return findings
    if op not in TENSORRT_OPS:
        return [Finding(ERROR, "unsupported-op", f"{op} is not supported by TensorRT 10", label)]
    for index, what in CONSTANT_INPUTS.get(op, {}).items():
        # TopK's K has its own, more specific message below.
        present = len(node.input) > index and bool(node.input[index])
        if op != "TopK" and present and not constants.is_constant(node.input[index]):
            findings.append(
                Finding(ERROR, "non-constant", f"{op} input {what!r} must be a build-time constant", label)
            )
    attrs = _attributes(node)
    if op == "TopK":
        findings += _check_topk(node, label, constants, max_k)
    elif op == "Resize":
        findings += _check_resize(node, label)
    elif op == "LayerNormalization":
        if any(out and out in used for out in node.output[1:]):
            findings.append(Finding(ERROR, "layernorm-outputs", "only output Y of LayerNormalization", label))
    elif op == "MaxPool":
        if len(node.output) > 1 and node.output[1] in used:
            findings.append(Finding(ERROR, "maxpool-indices", "MaxPool Indices output is unsupported", label))
    elif op == "Constant":
        for key in ("sparse_value", "value_string", "value_strings"):
            if key in attrs:
                findings.append(Finding(ERROR, "constant-attr", f"Constant {key} is unsupported", label))
    elif op == "ScatterND":
        if attrs.get("reduction", "none") != "none":
            findings.append(Finding(ERROR, "scatternd-reduction", "ScatterND reduction is unsupported", label))
    elif op == "Dropout":
        if len(node.input) > 2 and node.input[2]:
            training = constants.value(node.input[2])
            if training is None or bool(np.any(training)):
                findings.append(Finding(ERROR, "dropout-training", "Dropout training_mode must be constant false",
                                        label))
    elif op == "Cast" and attrs.get("to") == TensorProto.UINT8:
        findings.append(Finding(ERROR, "dtype", "Cast to UINT8 inside the network", label))
    return findings


def lint_model(
    model: onnx.ModelProto | str | Path,
    *,
    max_topk: int = TOPK_MAX_K,
    min_opset: int = MIN_OPSET,
    max_opset: int = MAX_OPSET,
) -> list[Finding]:
    """All findings for ``model`` (a ModelProto or a path); empty when the graph is clean.

    Shape inference runs first (on a copy) so intermediate tensor types can be checked; a graph
    on which it fails gets an error finding rather than an exception.
    """
    proto = onnx.load(str(model)) if isinstance(model, str | Path) else model
    findings: list[Finding] = []
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as err:  # noqa: BLE001 - onnx raises InferenceError and others
        findings.append(Finding(ERROR, "shape-inference", f"ONNX shape inference fails: {err}"))
        inferred = proto
    findings += _check_opsets(inferred, min_opset, max_opset)
    findings += _check_io(inferred)
    findings += _check_types(inferred)
    graph = inferred.graph
    if inferred.functions:
        names = ", ".join(f.name for f in inferred.functions)
        findings.append(Finding(ERROR, "functions", f"model-local functions are not inlined: {names}"))
    constants = _Constants(graph)
    used = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    for index, node in enumerate(graph.node):
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            # If/Loop/Scan bodies: the deployable graph has no control flow, so flag it for review.
            findings.append(Finding(WARNING, "subgraph", f"{node.op_type} has a subgraph; not linted inside",
                                    _node_label(node, index)))
        findings += _check_node(node, _node_label(node, index), constants, used, max_topk)
    return findings


def check_model(model: onnx.ModelProto | str | Path, source: str = "model", **kwargs: int) -> list[Finding]:
    """Lint and raise :class:`LintError` on any error-level finding; returns the (warning) findings."""
    findings = lint_model(model, **kwargs)
    if errors(findings):
        raise LintError(findings, source)
    return findings
