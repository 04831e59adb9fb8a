"""Session fixtures: real images from ../shared, tiny models, one tiny trained run.

The tiny encoder (``test_tiny_patch14``) has DINOv2's real block structure with random weights, at
56 px input, so every step of the pipeline runs for real in seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MTD = SHARED / "data" / "mtd"
VITS14 = SHARED / "weights" / "dinov2_vits14.safetensors"


def tiny_overrides(run_dir: Path, **extra: object) -> list[str]:
    """Config overrides for a seconds-long run on a few real MTD images."""
    values = {
        "name": run_dir.name,
        "out_dir": str(run_dir.parent),
        "data.dataset": "mtd",
        "data.root": str(MTD),
        "data.max_train": 24,
        "data.max_test": 16,
        "data.resize": 64,
        "data.crop": 56,
        "model.encoder": "test_tiny_patch14",
        "model.weights": "random",
        "train.iterations": 12,
        "train.batch_size": 4,
        "train.warmup_iterations": 3,
        "train.hm_ramp_iterations": 6,
        "train.checkpoint_every": 4,
        "train.device": "cpu",
        "llb.stages": "2",
        "llb.k": 3,
        "llb.submodel_iterations": 6,
        "eval.map_size": 64,
        "eval.overlays": 4,
        "eval.batch_size": 8,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only adds contention (8x here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run directory (stage 2 only), shared by exporter and runtime tests."""
    from llb_edge.config import load_config
    from llb_edge.trainer.pipeline import run_training

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    return run_training(load_config(None, tiny_overrides(run_dir)))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """(bundle dir, warning messages) of one export of the tiny run with formats="all" (read-only: copy to edit).

    Shared by the exporter and runtime tests: the torch.export-based exporter costs ~15 s a graph.
    """
    import warnings

    from llb_edge.exporters.bundle_export import export_bundle
    from llb_edge.exporters.export_options import ExportOptions

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_bundle(tiny_run, out, ExportOptions(formats="all", validation="test", model_id="tiny-model",
                                                  model_version="7"))
    return out, [str(w.message) for w in caught]
