"""The OpenVINO CPU backend: variants built from the tiny trained run, the decision gate, the cache
key, backend selection, and the daemon serving with --backend openvino.

Real OpenVINO and NNCF on the tiny Dinomaly run (56 px, random encoder) and real MTD images. The
tests that need OpenVINO are skipped, with the reason, where it is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from runtime_harness import REPO, Client, frame_parts, running_daemon

from llb_edge.bundle import MANIFEST_NAME, load_bundle, sha256_file
from llb_edge.exporters import parity
from llb_edge.runtime import openvino_backend as ov_backend
from llb_edge.runtime.backends import create_backend

pytest_plugins = ["runtime_fixtures"]  # contract-test-model bundles

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
    reason="openvino/nncf are not installed (pip install 'llb-edge[openvino]')",
)


@pytest.fixture(scope="module")
def ov_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported with its fp32 and bf16 OpenVINO variants, gated on this CPU.

    The random tiny encoder scores images close together, so bf16 may swap two of them and be
    rejected (Spearman < 0.999) on one CPU and pass on another (where bf16 falls back to f32).
    """
    from llb_edge.exporters.bundle_export import export_bundle
    from llb_edge.exporters.export_options import ExportOptions

    out = tmp_path_factory.mktemp("ov-bundles") / "tiny"
    export_bundle(tiny_run, out, ExportOptions(formats="openvino", precisions=("fp32",),
                                               openvino_precisions=("fp32", "bf16"),
                                               engine_cache_dir=tmp_path_factory.mktemp("ov-cache")))
    return out


@pytest.fixture
def ov_bundle_copy(ov_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ov_bundle, tmp_path / "bundle"))


def _variants(bundle_dir: Path) -> dict[str, str]:
    """precision -> bundle.json files key of the OpenVINO variants."""
    return {spec.precision: name for name, spec in load_bundle(bundle_dir).manifest.files.items()
            if spec.format == ov_backend.FORMAT}


def _edit_manifest(bundle_dir: Path, edit: callable) -> None:
    values = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    edit(values)
    (bundle_dir / MANIFEST_NAME).write_text(json.dumps(values))


# -- export and the gate ---------------------------------------------------------------------------


@needs_openvino
def test_export_adds_variants_gated_on_this_cpu(ov_bundle: Path) -> None:
    manifest = load_bundle(ov_bundle).manifest
    variants = _variants(ov_bundle)
    rejected = {report["candidate"]: report for report in manifest.extra["openvino_rejected"].values()}
    assert "fp32" in variants
    # bf16 is either accepted or rejected with its figures, never both and never silently dropped.
    assert ("bf16" in variants) != ("openvino-bf16" in rejected)
    for report in rejected.values():
        assert not report["passed"] and report["failures"] and report["images"] > 0
    cpu, version = ov_backend.detect_cpu(), ov_backend.openvino_version()
    gate = manifest.extra["gate_images"]
    assert gate["count"] >= parity.MIN_PARITY_IMAGES and all(Path(s).is_file() for s in gate["sources"])
    assert manifest.extra["calibration_images"]["count"] > 0
    for precision, name in variants.items():
        spec = manifest.files[name]
        assert spec.path == "model_fp32.onnx"  # fp32 and bf16 are compile-time hints on the same graph
        report = spec.parity
        assert report["passed"] and report["images"] == gate["count"]
        assert report["agreement"] == 1.0 and report["disagreements"] == 0 and report["spearman"] >= 0.999
        assert report["threshold"] == pytest.approx(manifest.threshold.value)
        assert report["map_max_abs"] <= parity.tolerance_for(precision).map_max_abs
        assert spec.target["cpu_key"] == cpu.key() and spec.target["openvino"] == version
        assert spec.target["inference_precision"] == ov_backend.INFERENCE_PRECISION[precision]
        assert spec.target["ms_per_image"] > 0
    assert manifest.files[variants["fp32"]].parity["map_max_abs"] <= 1e-4


@needs_openvino
def test_variants_reproduce_onnxruntime_in_their_precision(ov_bundle: Path) -> None:
    bundle = load_bundle(ov_bundle)
    images = parity.bundle_images(bundle, parity.GATE_IMAGES)
    reference = parity.run_onnxruntime(ov_bundle / "model_fp32.onnx", images, threads=1)
    capabilities = ov_backend.import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    for precision, expected_hint in (("fp32", "f32"), ("bf16", "bf16" if "BF16" in capabilities else "f32")):
        tolerance = parity.tolerance_for(precision)
        backend = ov_backend.OpenVinoBackend(ov_bundle / "model_fp32.onnx", precision=precision, threads=1)
        # Without the hint, OpenVINO runs bf16 on CPUs that have it: the fp32 variant must say f32.
        assert backend.inference_precision == expected_hint
        candidate = backend.run(images)
        report = parity.compare_outputs(reference, candidate, tolerance, "ort", precision)
        # Map and score bounds only: the rank rule is the gate's business (see ov_bundle).
        assert report.map_max_abs <= tolerance.map_max_abs and report.score_max_abs <= tolerance.score_max_abs
        backend.close()


@needs_openvino
def test_int8_gate_refuses_a_badly_calibrated_variant_without_torch(ov_bundle_copy: Path, tmp_path: Path) -> None:
    # A deliberately bad INT8 variant: calibrated on black images, its activation ranges are wrong
    # for every real image. Built through the CLI in a process where torch cannot be imported.
    black = np.zeros_like(np.load(ov_bundle_copy / "calibration_images.npy")[:2])  # 2: NNCF's time grows with it
    np.save(ov_bundle_copy / "calibration_images.npy", black)
    _edit_manifest(ov_bundle_copy, lambda m: m["extra"]["calibration_images"].update(
        sha256=sha256_file(ov_bundle_copy / "calibration_images.npy")))
    before = set(load_bundle(ov_bundle_copy).manifest.files)
    cache = tmp_path / "cache"
    program = "import sys; sys.modules['torch'] = None; from llb_edge.cli import main; sys.argv[0] = 'llb-edge'; main()"
    result = subprocess.run(
        [sys.executable, "-c", program, "bundle", "build-engine", str(ov_bundle_copy), "--engine", "openvino",
         "--precision", "int8", "--cache-dir", str(cache)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "rejected by the decision gate" in result.stderr and "openvino-int8" in result.stderr
    manifest = load_bundle(ov_bundle_copy).manifest
    assert set(manifest.files) == before  # nothing added
    rejection = next(r for r in manifest.extra["openvino_rejected"].values() if r["candidate"] == "openvino-int8")
    assert rejection["candidate"] == "openvino-int8" and not rejection["passed"] and rejection["failures"]
    assert rejection["target"]["calibration_images"] == len(black)
    assert not list(cache.glob("*.blob"))  # a rejected blob is never reused from the cache


def test_decision_gate_counts_flipped_decisions() -> None:
    rng = np.random.default_rng(0)
    scores = np.linspace(0.1, 0.5, 40).astype(np.float32)
    maps = rng.random((40, 1, 4, 4)).astype(np.float32)
    reference = (maps, scores, maps.reshape(40, -1).max(axis=1))
    threshold = float(scores[20]) - 1e-4  # 20 of 40 reference images are NG
    same = parity.check_decisions(reference, reference, threshold, "bf16", "same")
    assert same.passed and same.agreement == 1.0 and same.reference_ng == 20
    # One image just below the threshold moves just above it: ranks intact, one decision flipped.
    nudged = scores.copy()
    nudged[19] = threshold + 1e-6
    flipped = parity.check_decisions(reference, (maps, nudged, reference[2]), threshold, "bf16", "flip")
    assert flipped.spearman >= 0.999 and flipped.disagreements == 1 and flipped.agreement == pytest.approx(0.975)
    assert not flipped.passed and any("OK/NG agreement" in f for f in flipped.failures)
    assert "1 of 40 differ" in flipped.summary()
    broken = nudged.copy()
    broken[0] = np.nan
    assert parity.check_decisions(reference, (maps, broken, reference[2]), threshold, "bf16", "nan").disagreements == 2
    with pytest.raises(ValueError, match="threshold"):
        parity.compare_outputs(reference, reference, parity.decision_tolerance("int8"), "a", "b")


# -- the cache key and the machine -------------------------------------------------------------------


def test_cache_key_changes_with_each_part() -> None:
    cpu = ov_backend.CpuInfo("AMD EPYC", ("avx2", "avx512_bf16", "avx512f"))
    base = ov_backend.variant_cache_key("a" * 64, "2026.4.1", cpu, "int8")
    assert base == ov_backend.variant_cache_key("a" * 64, "2026.4.1", cpu, "int8")
    changed = [
        ov_backend.variant_cache_key("b" * 64, "2026.4.1", cpu, "int8"),
        ov_backend.variant_cache_key("a" * 64, "2026.3.0", cpu, "int8"),
        ov_backend.variant_cache_key("a" * 64, "2026.4.1", ov_backend.CpuInfo("Intel Xeon", cpu.flags), "int8"),
        ov_backend.variant_cache_key("a" * 64, "2026.4.1", ov_backend.CpuInfo(cpu.model, ("avx2", "avx512f")), "int8"),
        ov_backend.variant_cache_key("a" * 64, "2026.4.1", cpu, "bf16"),
    ]
    assert len({base, *changed}) == 6


def test_cpu_flags_keep_only_what_changes_kernels() -> None:
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu vme sse4_2 avx2 fma avx512f avx512_bf16 " \
          "avx512_vnni amx_tile hypervisor ibpb\nbugs\t\t: spectre_v1\n"
    assert ov_backend._cpuinfo_flags(x86) == ("amx_tile", "avx2", "avx512_bf16", "avx512_vnni", "avx512f", "fma",
                                              "sse4_2")
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm bf16 sve\n"
    assert ov_backend._cpuinfo_flags(arm) == ("asimd", "bf16", "sve")


def test_target_mismatch_names_the_difference() -> None:
    cpu = ov_backend.CpuInfo("AMD EPYC", ("avx2",))
    target = {"openvino": "2026.4.1", **cpu.describe()}
    assert ov_backend.target_mismatch(target, cpu, "2026.4.1") is None
    assert "OpenVINO 2026.4.1" in ov_backend.target_mismatch(target, cpu, "2026.5.0")
    other = ov_backend.CpuInfo("Intel Core i5", ("avx2",))
    assert "Intel Core i5" in ov_backend.target_mismatch(target, other, "2026.4.1")


@needs_openvino
def test_detect_cpu_reports_this_machines_flags() -> None:
    cpu = ov_backend.detect_cpu()
    assert cpu.model
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        assert set(cpu.flags) <= set(cpuinfo.read_text().split())


# -- backend selection and the daemon ------------------------------------------------------------------


@needs_openvino
def test_auto_takes_the_fastest_variant_for_this_machine(ov_bundle_copy: Path) -> None:
    variants = _variants(ov_bundle_copy)
    if "bf16" not in variants:  # rejected on this CPU (see ov_bundle): stand in an accepted entry
        variants["bf16"] = variants["fp32"].replace("fp32", "bf16")
        _edit_manifest(ov_bundle_copy, lambda m: m["files"].update(
            {variants["bf16"]: {**m["files"][variants["fp32"]], "precision": "bf16"}}))

    def speeds(bf16_ms: float, fp32_ms: float) -> callable:
        def edit(values: dict) -> None:
            values["files"][variants["bf16"]]["target"]["ms_per_image"] = bf16_ms
            values["files"][variants["fp32"]]["target"]["ms_per_image"] = fp32_ms
        return edit

    def chosen() -> str:
        backend = create_backend(load_bundle(ov_bundle_copy), "auto", intra_op_threads=1)
        backend.close()
        return backend.name

    _edit_manifest(ov_bundle_copy, speeds(1.0, 2.0))
    assert chosen() == "openvino-bf16"
    _edit_manifest(ov_bundle_copy, speeds(2.0, 1.0))
    assert chosen() == "openvino-fp32"
    # A variant gated on another CPU is skipped: its figures say nothing about this one.
    _edit_manifest(ov_bundle_copy, lambda m: m["files"][variants["fp32"]]["target"].update(cpu_key="another-cpu"))
    assert chosen() == "openvino-bf16"
    # And one whose gate failed is never served, whatever its speed. Nothing gated for this machine
    # left: auto keeps ONNX Runtime (OpenVINO on the plain fp32 graph is no faster), an explicit
    # choice gets OpenVINO on the fp32 graph.
    _edit_manifest(ov_bundle_copy, lambda m: m["files"][variants["bf16"]]["parity"].update(passed=False))
    assert chosen() == "ort-cpu"
    backend = create_backend(load_bundle(ov_bundle_copy), "openvino", intra_op_threads=1)
    assert backend.name == "openvino-fp32" and backend.inference_precision == "f32"
    backend.close()
    # Explicit choices still win over auto's order.
    backend = create_backend(load_bundle(ov_bundle_copy), "ort-cpu", intra_op_threads=1)
    assert backend.name == "ort-cpu"


@needs_openvino
def test_openvino_serves_the_fp32_graph_of_a_bundle_without_variants(bundle_dir: Path) -> None:
    backend = create_backend(load_bundle(bundle_dir), "openvino", intra_op_threads=1)
    assert backend.name == "openvino-fp32"
    frames = np.full((3, 64, 64, 3), 128, dtype=np.uint8)
    frames[1, 16:48, 16:48] = 255
    _, scores, _ = backend.run(frames)
    assert scores[1] > 0.1 > scores[0]  # the contract model: a white square is NG


@needs_openvino
def test_daemon_serves_real_images_with_backend_openvino(ov_bundle: Path) -> None:
    bundle = load_bundle(ov_bundle)
    sources = bundle.manifest.extra["gate_images"]["sources"][:6]
    frames = [cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB) for path in sources]
    expected = parity.run_onnxruntime(ov_bundle / "model_fp32.onnx",
                                      parity.bundle_images(bundle, parity.GATE_IMAGES)[:6], threads=1)[1]
    with running_daemon(ov_bundle, backend="openvino") as daemon, Client.of(daemon) as client:
        for frame_id, frame in enumerate(frames):
            client.send(frame_parts("cam-ov", frame_id, frame))
        headers = sorted(client.headers(len(frames), timeout_s=30), key=lambda h: h.frame_id)
    assert all(h.backend is not None and h.backend.startswith("openvino-") for h in headers)
    scores = np.array([h.score for h in headers])
    # Same pre-processing, same model: the served scores are the gated variant's (bf16 bound at most).
    assert np.max(np.abs(scores - expected)) <= parity.tolerance_for("bf16").score_max_abs
    threshold = bundle.threshold
    assert [h.decision for h in headers] == ["NG" if s >= threshold else "OK" for s in scores]
