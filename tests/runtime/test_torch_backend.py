"""The torch backend (runtime/torch_backend.py) on CPU: weights from the run or the bundle, the parity gate.

The CUDA parts (bf16 autocast, CUDA graphs, torch.compile) cannot run here (no GPU); bench/gpu_suite.py
exercises them on a device. Everything else runs for real: the tiny trained run exported to a
bundle, ONNX Runtime as the reference, real MTD parity images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llb_edge.bundle import MANIFEST_NAME, BundleError, load_bundle, sha256_file
from llb_edge.exporters.bundle_export import bundle_parity_images
from llb_edge.runtime.backends import BackendError, create_backend, self_check
from llb_edge.runtime.torch_backend import (
    TORCH_WEIGHTS_KEY,
    TorchBackend,
    add_torch_weights,
    batch_buckets,
    create_torch_backend,
    load_inspection_weights,
)

CROP, MAP_SIZE = 56, 64  # tests/conftest.py tiny_overrides


@pytest.fixture(scope="module")
def exported(tiny_bundle: tuple[Path, list[str]]) -> Path:
    """The tiny run's bundle (tests/conftest.py), shared with the exporter tests: read-only."""
    return tiny_bundle[0]


@pytest.fixture
def bundle_copy(exported: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(exported, target)
    return target


def _edit_manifest(bundle_dir: Path, **changes: object) -> None:
    path = bundle_dir / MANIFEST_NAME
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


def test_serves_from_the_source_run_and_passes_the_gate(exported: Path, one_thread: None) -> None:
    bundle = load_bundle(exported)
    backend = create_backend(bundle, "torch-cpu", max_batch=3)
    assert isinstance(backend, TorchBackend)
    assert (backend.name, backend.precision, backend.mode) == ("torch-cpu", "fp32", "eager")
    self_check(backend, CROP, MAP_SIZE)
    images = bundle_parity_images(bundle)
    maps, scores, maxes = backend.run(images)  # 8 images: split into chunks of max_batch 3
    assert maps.shape == (len(images), 1, MAP_SIZE, MAP_SIZE) and maps.dtype == np.float32
    from llb_edge.exporters.parity import run_onnxruntime

    ref_maps, ref_scores, _ = run_onnxruntime(bundle.file_path("onnx-fp32"), images, threads=1)
    assert np.max(np.abs(maps - ref_maps)) < 1e-4
    assert np.max(np.abs(scores - ref_scores)) < 1e-4
    assert np.allclose(maxes, maps.reshape(len(images), -1).max(axis=1), atol=1e-6)


def test_bundle_copy_of_the_weights_serves_without_the_run(bundle_copy: Path, one_thread: None) -> None:
    bundle = add_torch_weights(bundle_copy)
    spec = bundle.manifest.files[TORCH_WEIGHTS_KEY]
    assert spec.format == "safetensors" and spec.sha256 == sha256_file(bundle_copy / spec.path)
    _edit_manifest(bundle_copy, source_run="/nowhere/run")  # the run is not on this server
    backend = create_backend(load_bundle(bundle_copy), "torch-cpu")
    self_check(backend, CROP, MAP_SIZE)
    # The weights file is checksummed like every bundle file.
    weights = bundle_copy / spec.path
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(bundle_copy)


def test_wrong_weights_fail_the_parity_gate(bundle_copy: Path, one_thread: None) -> None:
    """A weights file that loads but is not the exported model never serves (its hash was made to match)."""
    bundle = add_torch_weights(bundle_copy)
    path = bundle_copy / bundle.manifest.files[TORCH_WEIGHTS_KEY].path
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    generator = torch.Generator().manual_seed(0)
    for name, tensor in tensors.items():  # every decoder matrix a little off: a model that was not exported
        if name.startswith("model.") and not name.startswith("model.encoder.") and tensor.ndim == 2:
            tensors[name] = tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
    save_file(tensors, str(path), metadata=metadata)
    values = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    values["files"][TORCH_WEIGHTS_KEY]["sha256"] = sha256_file(path)
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(values))
    with pytest.raises(BackendError, match="parity gate"):
        create_backend(load_bundle(bundle_copy), "torch-cpu")


def test_a_changed_run_is_refused(bundle_copy: Path, tiny_run: Path, tmp_path: Path) -> None:
    run_copy = tmp_path / "run"
    shutil.copytree(tiny_run, run_copy)
    tensors = load_file(str(run_copy / "model.safetensors"))
    save_file({name: t + 0.01 for name, t in tensors.items()}, str(run_copy / "model.safetensors"))
    _edit_manifest(bundle_copy, source_run=str(run_copy))
    with pytest.raises(BackendError, match="not the model this bundle was exported from"):
        create_backend(load_bundle(bundle_copy), "torch-cpu")
    _edit_manifest(bundle_copy, source_run="/nowhere/run")
    with pytest.raises(BackendError, match="add-torch-weights"):
        create_backend(load_bundle(bundle_copy), "torch-cpu")


def test_weights_file_round_trip_keeps_every_tensor(bundle_copy: Path) -> None:
    """The file holds the non-persistent buffers too (resampled position embedding, blur kernel)."""
    bundle = add_torch_weights(bundle_copy)
    model = load_inspection_weights(bundle_copy / bundle.manifest.files[TORCH_WEIGHTS_KEY].path)
    buffers = dict(model.named_buffers())
    assert "model.encoder.pos_embed" in buffers and "scorer.kernel" in buffers
    assert model.scorer.map_size == MAP_SIZE and model.scorer.input_size == CROP
    images = bundle_parity_images(bundle)[:2]
    with torch.no_grad():
        maps, _, _ = model(torch.from_numpy(images))
    assert torch.isfinite(maps).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_torch_cuda_is_refused_without_a_gpu(exported: Path) -> None:
    with pytest.raises(BackendError, match="no CUDA GPU"):
        create_backend(load_bundle(exported), "torch-cuda")


def test_cpu_runs_fp32_only_and_options_are_checked(exported: Path) -> None:
    bundle = load_bundle(exported)
    with pytest.raises(BackendError, match="autocast is for CUDA"):
        create_torch_backend(bundle, "cpu", precision="bf16")
    with pytest.raises(BackendError, match="precision must be"):
        create_torch_backend(bundle, "cpu", precision="int8")
    with pytest.raises(BackendError, match="device must be"):
        create_torch_backend(bundle, "mps")


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
