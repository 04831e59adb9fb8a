"""TensorRT exporter: build plan, cache key/paths, trtexec line and the accept/reject logic, without TensorRT.

Tests that need the real package use ``pytest.importorskip("tensorrt")``: they skip only where
TensorRT cannot be imported (the development and CI machines) and run on a GPU box that has it.
"""

from __future__ import annotations

import shlex
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_lint import contract_graph

from llb_edge.exporters import parity
from llb_edge.exporters import tensorrt as trt_export
from llb_edge.exporters.tensorrt import (
    BatchProfile,
    BuildPlan,
    EngineJob,
    GpuInfo,
    TensorRTError,
    build_plan,
    bundle_engine_name,
    engine_cache_key,
    engine_cache_path,
    timing_cache_path,
    trtexec_command,
)

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
ORIN = GpuInfo("Orin (nvgpu)", "8.7")
SHA = "ab" * 32


# -- build plan ---------------------------------------------------------------------------------


def test_tensorrt10_fp16_uses_builder_flag_on_fp32_onnx() -> None:
    plan = build_plan("10.3.0", "fp16")
    assert (plan.onnx_precision, plan.fp16_flag, plan.strongly_typed) == ("fp32", True, False)


def test_tensorrt10_strongly_typed_uses_fp16_onnx() -> None:
    plan = build_plan("10.3.0", "fp16", strongly_typed=True)
    assert (plan.onnx_precision, plan.fp16_flag, plan.strongly_typed) == ("fp16", False, True)


def test_tensorrt11_is_always_strongly_typed() -> None:
    plan = build_plan("11.0.1.5", "fp16")
    assert (plan.onnx_precision, plan.fp16_flag, plan.strongly_typed) == ("fp16", False, True)
    with pytest.raises(TensorRTError, match="always strongly typed"):
        build_plan("11.0", "fp16", strongly_typed=False)


def test_fp32_engine_disables_tf32() -> None:
    for version in ("10.3.0", "11.2.0"):
        plan = build_plan(version, "fp32")
        assert plan.onnx_precision == "fp32" and plan.disable_tf32 and not plan.fp16_flag


def test_old_tensorrt_and_bad_precision_refused() -> None:
    with pytest.raises(TensorRTError, match="too old"):
        build_plan("8.6.1", "fp16")
    with pytest.raises(ValueError, match="precision"):
        build_plan("10.3.0", "int8")


# -- profile, cache key and paths -----------------------------------------------------------------


def test_profile_shapes_and_validation() -> None:
    profile = BatchProfile(1, 8, 32)
    assert profile.shapes(392) == ((1, 392, 392, 3), (8, 392, 392, 3), (32, 392, 392, 3))
    assert profile.label() == "b1-8-32"
    for bad in ((0, 1, 2), (2, 1, 4), (1, 8, 4)):
        with pytest.raises(ValueError, match="min <= opt <= max"):
            BatchProfile(*bad)


def test_cache_key_is_stable_and_sensitive_to_every_component() -> None:
    profile = BatchProfile(1, 8, 32)
    key = engine_cache_key(SHA, "10.3.0", H100, "fp16", profile)
    assert key == engine_cache_key(SHA, "10.3.0", GpuInfo(H100.name, "9.0"), "fp16", BatchProfile(1, 8, 32))
    assert len(key) == 32 and all(c in "0123456789abcdef" for c in key)
    variants = [
        engine_cache_key("cd" * 32, "10.3.0", H100, "fp16", profile),
        engine_cache_key(SHA, "10.4.0", H100, "fp16", profile),
        engine_cache_key(SHA, "10.3.0", ORIN, "fp16", profile),
        engine_cache_key(SHA, "10.3.0", GpuInfo(H100.name, "8.0"), "fp16", profile),
        engine_cache_key(SHA, "10.3.0", H100, "fp32", profile),
        engine_cache_key(SHA, "10.3.0", H100, "fp16", BatchProfile(1, 16, 32)),
        engine_cache_key(SHA, "10.3.0", H100, "fp16", profile, strongly_typed=True),
    ]
    assert len({key, *variants}) == len(variants) + 1


def test_cache_paths(tmp_path: Path) -> None:
    key = engine_cache_key(SHA, "10.3.0", ORIN, "fp16", BatchProfile())
    path = engine_cache_path(tmp_path, key, ORIN, "10.3.0", "fp16")
    assert path.parent == tmp_path
    assert path.name == f"fp16-orin-nvgpu-sm87-trt10.3.0-{key}.engine"
    assert timing_cache_path(tmp_path, ORIN, "10.3.0").name == "timing-orin-nvgpu-sm87-trt10.3.0.cache"
    assert timing_cache_path(tmp_path, H100, "10.3.0") != timing_cache_path(tmp_path, ORIN, "10.3.0")
    assert bundle_engine_name(H100, "10.3.0", "fp16") == (
        "tensorrt-fp16-sm90-trt10.3.0", "model_fp16_nvidia-h100-80gb-hbm3-sm90_trt10.3.0.engine")


def test_default_cache_dir_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(trt_export.CACHE_ENV, str(tmp_path / "engines"))
    assert trt_export.default_cache_dir() == tmp_path / "engines"
    monkeypatch.delenv(trt_export.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert trt_export.default_cache_dir() == tmp_path / "xdg" / "llb-edge" / "engines"


# -- trtexec --------------------------------------------------------------------------------------


def test_trtexec_command_tensorrt10_fp16() -> None:
    plan = build_plan("10.3.0", "fp16")
    job = EngineJob(Path("b/model_fp32.onnx"), Path("out dir/e.engine"), 392, plan, BatchProfile(1, 8, 32),
                    workspace_bytes=2 << 30, timing_cache=Path("cache/t.cache"))
    line = trtexec_command(job)
    args = shlex.split(line)
    assert args[0] == "trtexec"
    assert "--onnx=b/model_fp32.onnx" in args
    assert "--saveEngine=out dir/e.engine" in args  # quoted, survives the space
    assert "--minShapes=images:1x392x392x3" in args
    assert "--optShapes=images:8x392x392x3" in args
    assert "--maxShapes=images:32x392x392x3" in args
    assert "--memPoolSize=workspace:2048M" in args
    assert "--timingCacheFile=cache/t.cache" in args
    assert "--fp16" in args and "--stronglyTyped" not in args


def _trtexec_args(plan: BuildPlan) -> list[str]:
    return shlex.split(trtexec_command(EngineJob(Path("m.onnx"), Path("e.engine"), 56, plan, BatchProfile())))


def test_trtexec_command_strongly_typed() -> None:
    ten = _trtexec_args(build_plan("10.8.0", "fp16", True))
    assert "--stronglyTyped" in ten and "--fp16" not in ten
    eleven = _trtexec_args(build_plan("11.1.0", "fp16"))
    # TensorRT 11 removed --fp16 and always types strongly: neither flag appears.
    assert "--stronglyTyped" not in eleven and "--fp16" not in eleven
    fp32 = _trtexec_args(build_plan("10.3.0", "fp32"))
    assert "--noTF32" in fp32


# -- missing TensorRT -----------------------------------------------------------------------------


def test_missing_tensorrt_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(TensorRTError, match="target machine"):
        trt_export.import_tensorrt()


def test_export_format_tensorrt_fails_fast_without_tensorrt(
    monkeypatch: pytest.MonkeyPatch, tiny_run: Path, tmp_path: Path
) -> None:
    from llb_edge.exporters.bundle_export import export_bundle
    from llb_edge.exporters.export_options import ExportOptions

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTError, match="--format tensorrt"):
        export_bundle(tiny_run, tmp_path / "bundle", ExportOptions(formats="tensorrt"))
    assert not (tmp_path / "bundle").exists()


# -- accept / reject logic with a stand-in builder --------------------------------------------------


@pytest.fixture
def contract_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "model_fp32.onnx"
    onnx.save(contract_graph(side=16, k=3), str(path))
    return path


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Pretend TensorRT 10.3 is installed; "building" writes a placeholder engine and is recorded."""
    built: list[Path] = []

    def fake_build(job: EngineJob) -> Path:
        job.engine_path.parent.mkdir(parents=True, exist_ok=True)
        job.engine_path.write_bytes(b"engine for " + job.onnx_path.name.encode())
        built.append(job.engine_path)
        return job.engine_path

    monkeypatch.setattr(trt_export, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(trt_export, "build_engine", fake_build)
    return built


def _ort_factory(onnx_path: Path, noise: float = 0.0):
    def factory(engine_path: Path, max_batch: int):
        run = parity.onnxruntime_runner(onnx_path)

        def noisy(batch: np.ndarray) -> parity.Outputs:
            maps, scores, maxes = run(batch)
            rng = np.random.default_rng(0)
            return maps + noise * rng.standard_normal(maps.shape).astype(np.float32), scores + noise, maxes
        return noisy, lambda: None
    return factory


def _images(count: int = 6) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (count, 16, 16, 3), dtype=np.uint8)


def test_engine_accepted_then_reused_from_cache(fake_tensorrt: list[Path], contract_onnx: Path, tmp_path: Path) -> None:
    kwargs = dict(onnx_paths={"fp32": contract_onnx}, input_size=16, images=_images(), precision="fp16",
                  profile=BatchProfile(1, 2, 4), cache_dir=tmp_path / "cache", gpu=ORIN,
                  runner_factory=_ort_factory(contract_onnx))
    first = trt_export.build_checked_engine(**kwargs)
    assert not first.cached and len(fake_tensorrt) == 1 and first.engine_path.is_file()
    assert first.parity["passed"] and first.parity["candidate"] == "tensorrt-fp16"
    assert first.target()["compute_capability"] == "8.7" and first.target()["profile"] == {"min": 1, "opt": 2,
                                                                                            "max": 4}
    assert first.trtexec.startswith("trtexec --onnx=") and "--fp16" in first.trtexec
    second = trt_export.build_checked_engine(**kwargs)
    assert second.cached and len(fake_tensorrt) == 1  # no second build
    assert second.engine_path == first.engine_path and second.key == first.key


def test_engine_failing_parity_is_rejected_and_evicted(
    fake_tensorrt: list[Path], contract_onnx: Path, tmp_path: Path
) -> None:
    with pytest.raises(TensorRTError, match="parity gate"):
        trt_export.build_checked_engine(
            {"fp32": contract_onnx}, 16, _images(), "fp16", BatchProfile(1, 2, 4), tmp_path / "cache", gpu=ORIN,
            runner_factory=_ort_factory(contract_onnx, noise=0.05),
        )
    assert len(fake_tensorrt) == 1
    assert not fake_tensorrt[0].exists()  # a rejected engine must not be served from the cache later


def test_missing_onnx_precision_is_reported(fake_tensorrt: list[Path], contract_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(TensorRTError, match="fp16 ONNX"):
        trt_export.build_checked_engine({"fp32": contract_onnx}, 16, _images(), "fp16", strongly_typed=True,
                                        cache_dir=tmp_path, gpu=ORIN)


def test_engine_added_to_an_existing_bundle(
    fake_tensorrt: list[Path], contract_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line-PC path: an ONNX bundle copied over, the engine built there and recorded in bundle.json."""
    from llb_edge.bundle import (
        BundleManifest,
        ModelFile,
        Preprocessing,
        Threshold,
        load_bundle,
        sha256_file,
        write_manifest,
    )
    from llb_edge.exporters import bundle_export

    root = tmp_path / "bundle"
    root.mkdir()
    (root / "model_fp32.onnx").write_bytes(contract_onnx.read_bytes())
    np.save(root / "parity_images.npy", _images())
    manifest = BundleManifest(
        model_id="m", model_version="1", created="now", source_run="run", encoder="e", weights_sha256="",
        preprocessing=Preprocessing(resize=18, crop=16), map_size=16, outputs={}, score_stats={},
        threshold=Threshold(0.5, "test", "me", "now"),
        files={"onnx-fp32": ModelFile("model_fp32.onnx", sha256_file(root / "model_fp32.onnx"), "onnx", "fp32")},
        extra={"parity_images": {"path": "parity_images.npy", "sha256": sha256_file(root / "parity_images.npy")}},
    )
    write_manifest(root, manifest)
    monkeypatch.setattr(trt_export, "detect_gpu", lambda device=0: ORIN)
    monkeypatch.setattr(bundle_export, "build_checked_engine",
                        lambda *a, **k: trt_export.build_checked_engine(*a, **k, runner_factory=_ort_factory(
                            contract_onnx)))
    bundle = bundle_export.add_tensorrt_engine(root, cache_dir=tmp_path / "cache")
    spec = bundle.manifest.files["tensorrt-fp16-sm87-trt10.3.0"]
    assert spec.format == "tensorrt" and spec.precision == "fp16" and spec.parity["passed"]
    assert spec.target["gpu"] == ORIN.name and spec.target["tensorrt"] == "10.3.0"
    assert (root / spec.path).read_bytes().startswith(b"engine for model_fp32.onnx")
    load_bundle(root)  # the engine's checksum is recorded and verifies


# -- the real thing, where TensorRT exists ------------------------------------------------------------


@pytest.mark.tensorrt
def test_real_engine_build_and_parity(contract_onnx: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    profile = BatchProfile(1, 2, 4)
    build = trt_export.build_checked_engine({"fp32": contract_onnx}, 16, _images(), "fp32", profile,
                                            tmp_path / "cache")
    assert build.engine_path.is_file() and build.parity["passed"]
    assert trt_export.timing_cache_path(tmp_path / "cache", build.gpu, build.trt_version).is_file()
    again = trt_export.build_checked_engine({"fp32": contract_onnx}, 16, _images(), "fp32", profile,
                                            tmp_path / "cache")
    assert again.cached
