"""Export end to end: tiny run -> bundle (fp32 + fp16 ONNX), lint, parity on real images, threshold.

One bundle is exported per session (the torch.export-based exporter takes ~15 s a graph) and copied
for the tests that modify it. The real ViT-S/14 architecture is exported and linted at 112 px.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import MTD, VITS14

from llb_edge.bundle import (
    INPUT_NAME,
    MANIFEST_NAME,
    MAP_OUTPUT,
    MAX_OUTPUT,
    SCHEMA_VERSION,
    SCORE_OUTPUT,
    BundleError,
    load_bundle,
    set_threshold,
    sha256_file,
)
from llb_edge.calibration import DEFAULT_CALIBRATION_OUTLIER_Z
from llb_edge.config import load_config
from llb_edge.exporters import parity
from llb_edge.exporters.bundle_export import bundle_parity_images, export_bundle, resolve_formats
from llb_edge.exporters.export_options import ExportOptions
from llb_edge.exporters.lint import LintError, lint_model
from llb_edge.exporters.onnx_export import ExportError, export_onnx
from llb_edge.exporters.parity import ParityError, rankdata, spearman
from llb_edge.runs import read_split

CROP, MAP = 56, 64  # tiny run geometry (conftest.tiny_overrides)


@pytest.fixture(scope="module")
def exported(tiny_bundle: tuple[Path, list[str]]) -> tuple[Path, list[str]]:
    """(bundle dir, warning messages) of one export of the tiny run with formats="all" (conftest)."""
    return tiny_bundle


@pytest.fixture
def bundle_copy(exported: tuple[Path, list[str]], tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(exported[0], target)
    return target


@pytest.fixture(scope="module")
def tiny_model(tiny_run: Path) -> torch.nn.Module:
    from llb_edge.runs import load_inspection_model

    with torch.random.fork_rng():
        torch.manual_seed(0)  # the run's train.seed: rebuilds its random encoder
        model, _, _ = load_inspection_model(tiny_run)
    return model


# -- the bundle ----------------------------------------------------------------------------------


def test_bundle_manifest(exported: tuple[Path, list[str]], tiny_run: Path) -> None:
    bundle = load_bundle(exported[0])  # verifies schema and every sha256
    m = bundle.manifest
    assert m.schema_version == SCHEMA_VERSION
    assert (m.model_id, m.model_version) == ("tiny-model", "7")
    assert m.source_run == str(tiny_run.resolve())
    assert m.encoder == "test_tiny_patch14"
    assert (m.preprocessing.resize, m.preprocessing.crop, m.preprocessing.layout) == (64, CROP, "NHWC")
    assert m.map_size == MAP
    assert m.outputs == {MAP_OUTPUT: ["batch", 1, MAP, MAP], SCORE_OUTPUT: ["batch"], MAX_OUTPUT: ["batch"]}
    recorded = json.loads((tiny_run / "train_scores.json").read_text())
    assert m.score_stats == recorded["stats"]
    assert set(m.files) == {"onnx-fp32", "onnx-fp16"}
    for name, spec in m.files.items():
        assert spec.format == "onnx" and name.endswith(spec.precision)
        assert spec.parity["passed"] and spec.parity["images"] >= parity.MIN_PARITY_IMAGES
        assert spec.external_data == {}  # single-file graphs; external data would be listed with its sha256
    extra = m.extra
    assert extra["score_range"] == [0.0, 2.0] and bundle.score_range == (0.0, 2.0)
    assert extra["input"] == {"name": INPUT_NAME, "shape": ["batch", CROP, CROP, 3], "dtype": "uint8",
                              "color": "RGB", "layout": "NHWC"}
    # The recorded training scores belong to the exported model (same random encoder, same weights).
    assert extra["train_scores_check"]["checked"] > 0
    assert extra["train_scores_check"]["max_abs_diff"] < 1e-4
    # What the runtime reads from extra, through the bundle's typed accessors.
    assert bundle.trained_weights_sha256 == sha256_file(tiny_run / "model.safetensors")
    assert bundle.top_fraction == extra["top_fraction"] == load_config(None, []).eval.top_fraction
    assert extra["backbone"] == {"source": "random", "path": None, "sha256": None}
    parity_sources = extra["parity_images"]["sources"]
    recorded_test = {s.path for s in read_split(tiny_run).test}
    assert len(parity_sources) == extra["parity_images"]["count"] and set(parity_sources) <= recorded_test


def test_parity_numbers_within_tolerance(exported: tuple[Path, list[str]]) -> None:
    files = load_bundle(exported[0]).manifest.files
    fp32, fp16 = files["onnx-fp32"].parity, files["onnx-fp16"].parity
    assert fp32["reference"] == "pytorch-fp32" and fp32["candidate"] == "onnxruntime-fp32"
    assert fp32["map_max_abs"] <= 1e-4 and fp32["score_max_abs"] <= 1e-4 and fp32["spearman"] >= 0.999
    assert fp16["map_max_abs"] <= 1e-2 and fp16["score_max_abs"] <= 5e-3 and fp16["spearman"] >= 0.99
    assert fp32["tolerance"] == {"map_max_abs": 1e-4, "score_max_abs": 1e-4, "min_spearman": 0.999,
                                 "min_agreement": None}


def test_fp16_on_cpu_passes_the_decision_gate_on_stored_real_images(exported: tuple[Path, list[str]]) -> None:
    bundle = load_bundle(exported[0])
    gate = bundle.manifest.extra["gate_images"]
    assert parity.bundle_images(bundle, parity.GATE_IMAGES).shape == (gate["count"], CROP, CROP, 3)
    assert all(str(MTD) in source for source in gate["sources"])
    calibration = bundle.manifest.extra["calibration_images"]
    assert calibration["count"] > 0 and not set(calibration["sources"]) & set(gate["sources"])
    decisions = bundle.manifest.files["onnx-fp16"].parity["decisions"]
    assert decisions["candidate"] == "onnxruntime-cpu-fp16" and decisions["reference"] == "onnxruntime-fp32"
    assert decisions["passed"] and decisions["images"] == gate["count"]
    assert decisions["spearman"] >= parity.DECISION_MIN_SPEARMAN
    assert decisions["agreement"] >= parity.DECISION_MIN_AGREEMENT
    assert decisions["threshold"] == pytest.approx(bundle.threshold)


def test_parity_images_are_real_test_images(exported: tuple[Path, list[str]]) -> None:
    bundle = load_bundle(exported[0])
    info = bundle.manifest.extra["parity_images"]
    images = bundle_parity_images(bundle)
    assert images.shape == (info["count"], CROP, CROP, 3) and images.dtype == np.uint8
    assert all(str(MTD) in source for source in info["sources"])
    # An even spread of defect and defect-free images, so the rank check means something.
    assert any("MT_Free" in s for s in info["sources"]) and any("MT_Free" not in s for s in info["sources"])


def test_thresholds(exported: tuple[Path, list[str]], tiny_run: Path) -> None:
    from llb_edge.exporters.threshold import calibrated_threshold, quantile_rule, read_calibration_scores

    m = load_bundle(exported[0]).manifest
    expected = calibrated_threshold(read_calibration_scores(tiny_run)[0])  # for the default 1% target
    assert m.threshold.value == pytest.approx(expected.value)
    assert m.threshold.method == expected.description and m.threshold.set_by == "llb-edge export"
    candidates = m.extra["threshold_candidates"]
    assert candidates["calibrated"]["value"] == pytest.approx(expected.value)
    assert candidates["quantile"]["value"] == pytest.approx(quantile_rule(tiny_run).value)
    assert candidates["f1max"]["method"] == "f1max" and candidates["f1max"]["count"] > 0
    # The bundle carries its calibration scores and what they say about the false-reject rate.
    calibration = json.loads((tiny_run / "calibration_scores.json").read_text())["scores"]
    assert m.extra["calibration"]["scores"] == sorted(calibration.values())
    assert m.extra["calibration"]["source"] == "training"
    frr = m.threshold.frr
    assert frr["target"] == 0.01 and frr["calibration_count"] == len(calibration) == 12
    # 1% needs 99 calibration images; the slice's outliers (suspected defects) are left out first.
    inliers = 12 - frr["excluded"]
    assert m.extra["calibration"]["outlier_z"] == frr["outlier_z"] == DEFAULT_CALIBRATION_OUTLIER_Z
    assert not frr["reachable"] and frr["expected"] == pytest.approx(1 / (inliers + 1))
    assert frr["upper"] == pytest.approx(1 - 0.05 ** (1 / inliers))
    # --validation test: measured rates at the chosen threshold, on the run's labelled test images.
    measured = m.extra["validation"]
    assert measured["threshold"] == m.threshold.value and measured["normal"] + measured["anomalous"] == 16
    assert 0 <= measured["false_reject_rate"] <= 1 and 0 <= measured["escape_rate"] <= 1


def test_target_frr_and_method_choice(exported: tuple[Path, list[str]], tiny_run: Path) -> None:
    from llb_edge.calibration import threshold_for_target
    from llb_edge.exporters.bundle_export import choose_threshold
    from llb_edge.runs import read_run_config

    cfg, onnx_fp32 = read_run_config(tiny_run), exported[0] / "model_fp32.onnx"
    calibration = list(json.loads((tiny_run / "calibration_scores.json").read_text())["scores"].values())
    decision = choose_threshold(tiny_run, cfg, onnx_fp32, None, "calibrated", 0.25)
    assert decision.chosen.value == threshold_for_target(calibration, 0.25).threshold
    assert decision.frr["reachable"] and decision.frr["target"] == 0.25 and decision.validation is None
    decision = choose_threshold(tiny_run, cfg, onnx_fp32, None, "quantile", 0.25)
    assert decision.frr["target"] is None and decision.frr["calibration_count"] == 12  # estimated all the same
    assert decision.chosen.method == "quantile" and set(decision.candidates) == {"quantile", "calibrated"}
    with pytest.raises(ExportError, match="target false-reject rate"):
        export_bundle(tiny_run, onnx_fp32.parent / "never", ExportOptions(precisions=("fp32",), target_frr=1.5))


def test_tensorrt_skipped_with_a_warning_for_all(exported: tuple[Path, list[str]]) -> None:
    bundle, messages = exported
    assert any("TensorRT skipped" in m for m in messages)
    assert any("--format tensorrt" in note for note in load_bundle(bundle).manifest.extra["skipped"])


# -- the graphs ------------------------------------------------------------------------------------


def test_graphs_lint_clean_and_follow_the_contract(exported: tuple[Path, list[str]]) -> None:
    for name in ("model_fp32.onnx", "model_fp16.onnx"):
        model = onnx.load(str(exported[0] / name))
        assert lint_model(model) == [], name
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version >= 17
        ops = {node.op_type for node in model.graph.node}
        assert "Einsum" not in ops
        (topk,) = [n for n in model.graph.node if n.op_type == "TopK"]
        k = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}[topk.input[1]]
        assert int(k.reshape(-1)[0]) == int(MAP * MAP * 0.01)
        for node in model.graph.node:
            if node.op_type == "Resize":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                assert attrs.get("antialias", 0) == 0 and attrs["mode"] == b"linear"
        # The position embedding is a constant of the graph (grid 4x4 + CLS), not computed.
        pos = [t for t in model.graph.initializer if t.name.endswith("pos_embed")]
        assert len(pos) == 1 and list(pos[0].dims) == [1, 1 + (CROP // 14) ** 2, 32]
        (image_input,) = model.graph.input
        assert image_input.name == INPUT_NAME
        assert image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert [o.name for o in model.graph.output] == [MAP_OUTPUT, SCORE_OUTPUT, MAX_OUTPUT]
        assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)


def test_fp16_graph_keeps_sensitive_parts_in_fp32(exported: tuple[Path, list[str]]) -> None:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(exported[0] / "model_fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    weights = [t.data_type for t in model.graph.initializer if len(t.dims) >= 2]
    assert weights.count(onnx.TensorProto.FLOAT16) > len(weights) // 2  # the matmuls run in fp16
    layer_norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert layer_norms and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in layer_norms)
    (topk,) = [n for n in model.graph.node if n.op_type == "TopK"]
    assert types[topk.input[0]] == onnx.TensorProto.FLOAT


def test_dynamic_batch_gives_the_same_answers(exported: tuple[Path, list[str]]) -> None:
    images = bundle_parity_images(load_bundle(exported[0]))
    run = parity.onnxruntime_runner(exported[0] / "model_fp32.onnx")
    together = run(images[:3])
    alone = [run(images[i : i + 1]) for i in range(3)]
    for k in range(3):
        np.testing.assert_allclose(together[k], np.concatenate([a[k] for a in alone]), atol=1e-6)
    assert together[0].shape == (3, 1, MAP, MAP)


def test_onnx_matches_torch_on_real_images(exported: tuple[Path, list[str]], tiny_model: torch.nn.Module) -> None:
    images = bundle_parity_images(load_bundle(exported[0]))
    report = parity.check_onnx_parity(tiny_model, exported[0] / "model_fp32.onnx", images, "fp32")
    assert report.passed, report.summary()
    print(report.summary())


# -- gates that refuse ---------------------------------------------------------------------------------


def _swap_export(monkeypatch: pytest.MonkeyPatch, source: Path, edit) -> None:
    """Make export_bundle "export" an edited copy of an already exported graph (no 15 s export)."""
    from llb_edge.exporters import bundle_export
    from llb_edge.exporters.onnx_export import OnnxExport

    def fake(model, path, precision="fp32", opset=18, metadata=None):
        proto = onnx.load(str(source))
        edit(proto)
        onnx.save(proto, str(path))
        return OnnxExport(Path(path), precision, opset, 0.0, len(proto.graph.node))

    monkeypatch.setattr(bundle_export, "export_onnx", fake)


def _set_initializer(proto: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for index, tensor in enumerate(proto.graph.initializer):
        if tensor.name == name:
            proto.graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(value, name))
            return
    raise KeyError(name)


def test_altered_graph_fails_the_parity_gate(
    exported: tuple[Path, list[str]], tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def blur_more(proto: onnx.ModelProto) -> None:
        (kernel,) = [t for t in proto.graph.initializer if list(t.dims) == [1, 1, 5, 5]]
        _set_initializer(proto, kernel.name, onnx.numpy_helper.to_array(kernel) * 1.05)

    _swap_export(monkeypatch, exported[0] / "model_fp32.onnx", blur_more)
    with pytest.raises(ParityError, match="parity gate failed"):
        export_bundle(tiny_run, tmp_path / "bad", ExportOptions(precisions=("fp32",)))
    assert list(tmp_path.iterdir()) == []  # nothing left behind, not even the staging folder


def test_topk_too_large_fails_the_lint(
    exported: tuple[Path, list[str]], tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def widen_topk(proto: onnx.ModelProto) -> None:
        (topk,) = [n for n in proto.graph.node if n.op_type == "TopK"]
        _set_initializer(proto, topk.input[1], np.array([4000], dtype=np.int64))

    _swap_export(monkeypatch, exported[0] / "model_fp32.onnx", widen_topk)
    with pytest.raises(LintError, match="TopK K=4000"):
        export_bundle(tiny_run, tmp_path / "bad", ExportOptions(precisions=("fp32",)))
    assert list(tmp_path.iterdir()) == []


def test_tampered_model_file_fails_bundle_load(bundle_copy: Path) -> None:
    with open(bundle_copy / "model_fp32.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="fails its checksum"):
        load_bundle(bundle_copy)


def test_schema_mismatch_fails_bundle_load(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version"):
        load_bundle(bundle_copy)


def test_existing_bundle_is_not_overwritten(exported: tuple[Path, list[str]], tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--overwrite"):
        export_bundle(tiny_run, exported[0])
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a bundle"):
        export_bundle(tiny_run, stranger, ExportOptions(overwrite=True))
    assert (stranger / "todo.txt").read_text() == "keep me"


def test_format_resolution() -> None:
    assert resolve_formats("onnx") == (["onnx"], False)
    assert resolve_formats("all") == (["onnx", "tensorrt"], True)  # OpenVINO only by name: built per CPU
    assert resolve_formats("openvino") == (["openvino"], False)
    assert resolve_formats(["tensorrt"]) == (["tensorrt"], False)
    with pytest.raises(ExportError, match="unknown"):
        resolve_formats("tflite")


# -- threshold editing ---------------------------------------------------------------------------------


def test_set_threshold_round_trip(bundle_copy: Path) -> None:
    before = load_bundle(bundle_copy).manifest.threshold
    set_threshold(bundle_copy, 0.123, set_by="line-operator")
    after = load_bundle(bundle_copy)  # checksums still verify: bundle.json is not a listed file
    assert after.threshold == pytest.approx(0.123)
    t = after.manifest.threshold
    assert (t.method, t.set_by) == ("operator", "line-operator")
    assert t.history[-1]["value"] == pytest.approx(before.value) and t.history[-1]["set_by"] == "llb-edge export"
    with pytest.raises(BundleError, match="finite"):
        set_threshold(bundle_copy, float("nan"))


# -- parity maths ------------------------------------------------------------------------------------


def test_rank_correlation() -> None:
    assert spearman(np.arange(6), np.arange(6) ** 3) == pytest.approx(1.0)
    assert spearman(np.arange(6), -np.arange(6.0)) == pytest.approx(-1.0)
    np.testing.assert_array_equal(rankdata(np.array([10, 20, 20, 30])), [1, 2.5, 2.5, 4])
    # Ties in b: ranks [1, 2, 3.5, 5, 3.5]; Pearson of the ranks = 8 / sqrt(10 * 9.5).
    assert spearman(np.array([1, 2, 3, 4, 5]), np.array([5, 6, 7, 8, 7])) == pytest.approx(8 / np.sqrt(95))
    assert spearman(np.ones(4), np.ones(4)) == 1.0 and spearman(np.ones(4), np.arange(4)) == 0.0


def test_compare_outputs_flags_each_failure() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((5, 1, 8, 8)).astype(np.float32)
    scores, maxes = maps.reshape(5, -1).mean(1), maps.reshape(5, -1).max(1)
    tol = parity.tolerance_for("fp32")
    assert parity.compare_outputs((maps, scores, maxes), (maps, scores, maxes), tol, "a", "b").passed
    swapped = scores.copy()
    order = np.argsort(scores)
    swapped[order[0]], swapped[order[-1]] = swapped[order[-1]], swapped[order[0]]
    report = parity.compare_outputs((maps, scores, maxes), (maps, swapped, maxes), tol, "a", "b")
    assert not report.passed and any("Spearman" in f for f in report.failures)
    nan_maps = maps.copy()
    nan_maps[0, 0, 0, 0] = np.nan
    report = parity.compare_outputs((maps, scores, maxes), (nan_maps, scores, maxes), tol, "a", "b")
    assert not report.passed and "NaN" in report.failures[0]


def test_spread_indices() -> None:
    labels = [0] * 10 + [1] * 6
    picked = parity.spread_indices(labels, 8)
    assert len(picked) == 8 and sum(labels[i] for i in picked) == 4
    assert parity.spread_indices([0] * 3, 8) == [0, 1, 2]


# -- the real architecture ---------------------------------------------------------------------------


@pytest.mark.slow  # ~25-35 s on two shared cores: the export alone is ~20 s
@pytest.mark.skipif(not VITS14.is_file(), reason="ViT-S/14 weights not in ../shared/weights")
def test_real_vit_s14_exports_lint_clean(tmp_path: Path) -> None:
    """DINOv2 ViT-S/14 (real weights, random decoder) at 112 px: the real graph passes lint and parity."""
    from llb_edge.data.images import read_image_rgb
    from llb_edge.data.transforms import Geometry
    from llb_edge.models.dinomaly import AnomalyScorer, InspectionModel, create_dinomaly

    size = 112
    torch.manual_seed(0)
    dinomaly, record = create_dinomaly("vit_small_patch14_dinov2", size, str(VITS14))
    assert record["sha256"]
    model = InspectionModel(dinomaly, AnomalyScorer(size, map_size=64)).eval()
    result = export_onnx(model, tmp_path / "vits14.onnx", "fp32")
    assert lint_model(result.path) == []
    assert result.op_counts.get("Einsum", 0) == 0
    proto = onnx.load(str(result.path))
    pos = [t for t in proto.graph.initializer if t.name.endswith("pos_embed")]
    assert [list(t.dims) for t in pos] == [[1, 1 + (size // 14) ** 2, 384]]
    paths = sorted((MTD / "MT_Blowhole" / "Imgs").glob("*.jpg"))[:3] + sorted((MTD / "MT_Free" / "Imgs").glob(
        "*.jpg"))[:3]
    geometry = Geometry(128, size)
    images = np.stack([geometry.to_model_input(read_image_rgb(p)) for p in paths])
    report = parity.check_onnx_parity(model, result.path, images, "fp32")
    print(f"ViT-S/14 112 px export {result.seconds:.1f} s; {report.summary()}")
    assert report.passed, report.summary()
