"""The TensorRT-compatibility lint on small hand-built graphs: each known trap must be caught.

The exported models themselves are linted in test_export.py (tiny run, and the real ViT-S/14).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llb_edge.bundle import INPUT_NAME, MAP_OUTPUT, MAX_OUTPUT, SCORE_OUTPUT
from llb_edge.exporters.lint import ERROR, TOPK_MAX_K, LintError, check_model, errors, lint_model

SIDE = 64  # map side: 64 * 64 = 4096 pixels, so TopK K=4000 is valid ONNX but too big for TensorRT


def const(name: str, values: object, dtype: type = np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def contract_graph(
    side: int = SIDE,
    k: int = 40,
    extra_nodes: list[onnx.NodeProto] | None = None,
    extra_inits: list[onnx.TensorProto] | None = None,
    map_from: str = "map",
    opset: int = 18,
    input_dims: tuple[object, ...] | None = None,
) -> onnx.ModelProto:
    """A minimal graph honouring the bundle contract: uint8 NHWC -> (map, top-k mean, max).

    map = channel mean of the normalised image; score = mean of its top-k pixels (TopK), as the
    real scorer does. ``extra_nodes`` may rewrite the map tensor (``map_from`` names the result).
    """
    dims = input_dims or ("batch", side, side, 3)
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x", "c255"], ["xn"]),
        helper.make_node("Transpose", ["xn"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("ReduceMean", ["nchw", "axis1"], ["map"], keepdims=1),
        *(extra_nodes or []),
        helper.make_node("Identity", [map_from], [MAP_OUTPUT]),
        helper.make_node("Flatten", [MAP_OUTPUT], ["flat"], axis=1),
        helper.make_node("TopK", ["flat", "k"], ["top", "top_idx"], axis=1),
        helper.make_node("ReduceMean", ["top", "axis1"], [SCORE_OUTPUT], keepdims=0),
        helper.make_node("ReduceMax", ["flat", "axis1"], [MAX_OUTPUT], keepdims=0),
    ]
    inits = [
        const("c255", 255.0, np.float32),
        const("axis1", [1]),
        const("k", [k]),
        *(extra_inits or []),
    ]
    graph = helper.make_graph(
        nodes,
        "contract",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, list(dims))],
        [
            helper.make_tensor_value_info(MAP_OUTPUT, TensorProto.FLOAT, ["batch", 1, side, side]),
            helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info(MAX_OUTPUT, TensorProto.FLOAT, ["batch"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def codes(model: onnx.ModelProto) -> set[str]:
    return {f.code for f in errors(lint_model(model))}


def test_clean_contract_graph_passes_and_runs() -> None:
    model = contract_graph()
    onnx.checker.check_model(model, full_check=True)
    assert lint_model(model) == []
    assert check_model(model) == []
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (2, SIDE, SIDE, 3), dtype=np.uint8)
    maps, scores, maxes = session.run(None, {INPUT_NAME: images})
    assert maps.shape == (2, 1, SIDE, SIDE) and scores.shape == (2,) and maxes.shape == (2,)


def test_topk_above_tensorrt_limit_fails() -> None:
    model = contract_graph(k=4000)
    onnx.checker.check_model(model, full_check=True)  # valid ONNX, only TensorRT refuses it
    findings = errors(lint_model(model))
    assert [f.code for f in findings] == ["topk-k"]
    assert "4000" in findings[0].message and str(TOPK_MAX_K) in findings[0].message
    with pytest.raises(LintError, match="topk-k"):
        check_model(model, source="broken.onnx")


def test_topk_at_the_limit_passes() -> None:
    assert codes(contract_graph(k=TOPK_MAX_K)) == set()


def test_topk_with_runtime_k_fails() -> None:
    model = contract_graph()
    # K computed from the input shape at run time instead of a constant.
    for node in model.graph.node:
        if node.op_type == "TopK":
            node.input[1] = "k_dynamic"
    model.graph.node.insert(0, helper.make_node("Shape", [INPUT_NAME], ["k_dynamic"], start=1, end=2))
    assert "topk-k" in codes(model)


def test_unsorted_topk_fails() -> None:
    model = contract_graph()
    for node in model.graph.node:
        if node.op_type == "TopK":
            node.attribute.append(helper.make_attribute("sorted", 0))
    assert "topk-sorted" in codes(model)


def test_einsum_fails() -> None:
    einsum = helper.make_node("Einsum", ["map", "map"], ["squared"], equation="...ij,...ij->...ij")
    model = contract_graph(extra_nodes=[einsum], map_from="squared")
    onnx.checker.check_model(model, full_check=True)
    assert codes(model) == {"einsum"}


@pytest.mark.parametrize(
    ("attrs", "code"),
    [
        ({"mode": "linear", "antialias": 1}, "resize-antialias"),
        ({"mode": "cubic"}, "resize-mode"),
        ({"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"}, "resize-coordinates"),
        ({"mode": "linear", "keep_aspect_ratio_policy": "not_larger"}, "resize-aspect"),
    ],
)
def test_unsupported_resize_fails(attrs: dict[str, object], code: str) -> None:
    resize = helper.make_node("Resize", ["map", "", "scales"], ["resized"], **attrs)
    model = contract_graph(
        side=SIDE,
        extra_nodes=[resize],
        extra_inits=[const("scales", [1.0, 1.0, 1.0, 1.0], np.float32)],
        map_from="resized",
    )
    assert code in codes(model)


def test_plain_bilinear_resize_passes() -> None:
    resize = helper.make_node("Resize", ["map", "", "scales"], ["resized"], mode="linear",
                              coordinate_transformation_mode="align_corners", antialias=0)
    model = contract_graph(extra_nodes=[resize], extra_inits=[const("scales", [1.0, 1.0, 1.0, 1.0], np.float32)],
                           map_from="resized")
    assert codes(model) == set()


def test_unsupported_and_custom_ops_fail() -> None:
    unique = helper.make_node("Unique", ["map"], ["uniq"])  # not imported by TensorRT 10
    custom = helper.make_node("FancyBlur", ["map"], ["blurred"], domain="com.example")
    model = contract_graph(extra_nodes=[unique, custom], map_from="blurred")
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    found = {(f.code, f.node) for f in errors(lint_model(model))}
    assert ("unsupported-op", "Unique#4") in found
    assert any(code == "custom-op" for code, _ in found)


@pytest.mark.parametrize("opset", [16, 21])
def test_opset_outside_range_fails(opset: int) -> None:
    assert "opset" in codes(contract_graph(opset=opset))


def test_dynamic_non_batch_dimension_fails() -> None:
    model = contract_graph(input_dims=("batch", "height", SIDE, 3))
    found = errors(lint_model(model))
    assert [(f.code, f.node) for f in found if f.code == "dynamic-dim"] == [("dynamic-dim", INPUT_NAME)]


def test_uint8_inside_the_network_fails() -> None:
    # Transposing before casting keeps a UINT8 tensor inside the network: TensorRT refuses that.
    model = contract_graph()
    nodes = list(model.graph.node)
    nodes[0] = helper.make_node("Transpose", [INPUT_NAME], ["raw_nchw"], perm=[0, 3, 1, 2])
    nodes[1] = helper.make_node("Cast", ["raw_nchw"], ["nchw_f"], to=TensorProto.FLOAT)
    nodes[2] = helper.make_node("Div", ["nchw_f", "c255"], ["nchw"])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    found = errors(lint_model(model))
    assert [(f.code, f.node) for f in found] == [("dtype", "raw_nchw")]


def test_reduce_axes_must_be_constant() -> None:
    model = contract_graph()
    model.graph.node.insert(0, helper.make_node("Shape", [INPUT_NAME], ["rank_axes"], start=0, end=1))
    for node in model.graph.node:
        if node.op_type == "ReduceMax":
            node.input[1] = "rank_axes"
    assert "non-constant" in codes(model)


def test_findings_render_readably() -> None:
    finding = errors(lint_model(contract_graph(k=4000)))[0]
    assert finding.level == ERROR
    assert str(finding).startswith("error topk-k [TopK#")
