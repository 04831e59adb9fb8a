"""Backends on the contract test model: outputs, batching, selection, self-check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from runtime_harness import CROP, MAP_SIZE, make_bundle

from llb_edge.bundle import load_bundle
from llb_edge.runtime.backends import BackendError, OnnxRuntimeBackend, create_backend, self_check

pytest_plugins = ["runtime_fixtures"]  # contract-test-model bundles


def _batch(count: int) -> np.ndarray:
    batch = np.full((count, CROP, CROP, 3), 128, dtype=np.uint8)
    for index in range(count):
        batch[index, :16, : 16 * (index % 4)] = 255  # each image a different hot area
    return batch


def test_ort_backend_honours_the_contract(contract_onnx: Path) -> None:
    backend = OnnxRuntimeBackend(contract_onnx, max_batch=2, intra_op_threads=1)
    batch = _batch(5)  # over max_batch: split into chunks transparently
    maps, scores, maxes = backend.run(batch)
    assert maps.shape == (5, 1, MAP_SIZE, MAP_SIZE) and maps.dtype == np.float32
    assert scores.shape == (5,) and maxes.shape == (5,)
    expected_maps = np.abs(batch / 255.0 - 0.5).mean(axis=3).reshape(5, MAP_SIZE, 4, MAP_SIZE, 4).mean(axis=(2, 4))
    assert np.allclose(maps[:, 0], expected_maps, atol=1e-5)
    assert np.allclose(maxes, expected_maps.reshape(5, -1).max(axis=1), atol=1e-5)
    assert scores[0] < 0.01 and scores[1] == pytest.approx(0.5, abs=1e-4)


def test_fixed_batch_graph_is_padded(fixed_batch_onnx: Path, contract_onnx: Path) -> None:
    fixed = OnnxRuntimeBackend(fixed_batch_onnx, max_batch=16, intra_op_threads=1)
    assert fixed.max_batch == 3
    dynamic = OnnxRuntimeBackend(contract_onnx, intra_op_threads=1)
    batch = _batch(4)
    for got, want in zip(fixed.run(batch), dynamic.run(batch), strict=True):
        assert np.allclose(got, want)


def test_auto_selection_falls_back_to_cpu_and_explicit_choices_fail_loudly(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert create_backend(bundle, "auto", intra_op_threads=1).name in ("tensorrt", "ort-cuda", "ort-cpu")
    assert create_backend(bundle, "ort-cpu", intra_op_threads=1).name == "ort-cpu"
    # The bundle has no engine, so tensorrt fails whether or not the package is installed.
    with pytest.raises(BackendError):
        create_backend(bundle, "tensorrt")
    with pytest.raises(BackendError):
        create_backend(bundle, "no-such-backend")


def test_self_check_refuses_nan_model(tmp_path: Path, nan_onnx: Path, contract_onnx: Path) -> None:
    good = OnnxRuntimeBackend(contract_onnx, intra_op_threads=1)
    self_check(good, CROP, MAP_SIZE)
    with pytest.raises(BackendError, match="map"):
        self_check(good, CROP, MAP_SIZE * 2)  # a bundle.json that lies about the map size
    broken = OnnxRuntimeBackend(make_bundle(tmp_path / "nan", nan_onnx) / "model.onnx", intra_op_threads=1)
    with pytest.raises(BackendError, match="non-finite"):
        self_check(broken, CROP, MAP_SIZE)


def test_unloadable_model_is_a_backend_error(tmp_path: Path) -> None:
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"not an onnx file")
    with pytest.raises(BackendError, match="cannot load"):
        OnnxRuntimeBackend(garbage)
