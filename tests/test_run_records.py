"""A run's records (llb_edge.runs): its split, and its metadata, each written once and typed.

The run's split has one owner: what the trainer used is what export, eval and retrain read.

With contamination and a test cap (the demo's settings) the split cannot be rebuilt two ways: the
synthetic protocol moves defective test images into train before the cap, so a rebuild that caps
first plants other images and gives another test set, some of whose images the model trained on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_overrides

from llb_edge.config import load_config
from llb_edge.data.samples import Sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def contaminated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with contamination and a test cap: 2 defects planted in train, 16 test images."""
    from llb_edge.trainer.pipeline import run_training

    run_dir = tmp_path_factory.mktemp("split") / "contaminated"
    return run_training(load_config(None, tiny_overrides(run_dir, data__contamination=0.1, data__max_test=16)),
                        evaluate_after=False)


def paths(samples: list[Sample]) -> list[str]:
    return [s.path for s in samples]


def test_the_exporters_test_split_is_the_trainers(contaminated_run: Path) -> None:
    from llb_edge.exporters.bundle_export import validation_samples
    from llb_edge.runs import read_run_config
    from llb_edge.trainer.pipeline import load_split

    cfg = read_run_config(contaminated_run)
    trained = load_split(cfg)
    exported_test = validation_samples(contaminated_run, "test")
    assert not set(paths(exported_test)) & set(paths(trained.train)), "the exporter's test split holds training images"
    assert paths(exported_test) == paths(trained.test)


def test_the_recorded_split_is_what_the_trainer_read(contaminated_run: Path) -> None:
    from llb_edge.data.samples import load_sample_list
    from llb_edge.runs import TRAIN_LIST, read_json, read_run_config, read_split
    from llb_edge.trainer.pipeline import load_split

    recorded = read_split(contaminated_run)
    trained = load_split(read_run_config(contaminated_run))
    assert (recorded.dataset, recorded.train, recorded.test) == (trained.name, trained.train, trained.test)
    assert sum(s.label == 1 for s in recorded.train) == int(0.1 * 24)  # the planted defects, labels kept
    trained_on = set(paths(load_sample_list(contaminated_run / TRAIN_LIST)))
    calibration = set(paths(recorded.calibration))
    assert calibration == set(read_json(contaminated_run / "calibration_scores.json")["scores"])
    assert trained_on | calibration == set(paths(recorded.train)) and not trained_on & calibration


def test_parity_and_gate_images_come_from_the_recorded_test_split(contaminated_run: Path) -> None:
    from llb_edge.exporters.bundle_export import decision_image_sets, parity_image_set
    from llb_edge.runs import read_run_config, read_split

    cfg = read_run_config(contaminated_run)
    recorded = read_split(contaminated_run)
    _, parity_sources = parity_image_set(contaminated_run, cfg, None, 8)
    assert set(parity_sources) <= set(paths(recorded.test)) and len(parity_sources) == 8
    (_, gate_sources), _ = decision_image_sets(contaminated_run, cfg, 12, 4)
    from_test = set(gate_sources) - set(paths(recorded.train))
    assert from_test and from_test <= set(paths(recorded.test))


def test_eval_reads_the_recorded_test_split(contaminated_run: Path, tmp_path: Path) -> None:
    import shutil

    from llb_edge.runs import SPLIT, read_json, write_json
    from llb_edge.trainer.pipeline import run_evaluation

    run = tmp_path / "run"
    shutil.copytree(contaminated_run, run)
    record = read_json(run / SPLIT)
    normal = [s for s in record["test"] if s["label"] == 0][:3]
    defective = [s for s in record["test"] if s["label"] == 1][:2]
    write_json(run / SPLIT, record | {"test": normal + defective})
    metrics = run_evaluation(run, device="cpu")
    assert (metrics["test_images"], metrics["test_anomalous"]) == (5, 2)


def test_a_run_without_a_split_record_rebuilds_it_as_its_trainer_did(contaminated_run: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from llb_edge.runs import CONFIG, SPLIT, RunError, read_split

    run = tmp_path / "old"
    shutil.copytree(contaminated_run, run)
    (run / SPLIT).unlink()
    assert read_split(run) == read_split(contaminated_run)
    config = json.loads((run / CONFIG).read_text())
    config["data"]["root"] = str(tmp_path / "elsewhere")
    (run / CONFIG).write_text(json.dumps(config))
    with pytest.raises(RunError, match="cannot be read here"):
        read_split(run)
    newer = json.loads((contaminated_run / SPLIT).read_text()) | {"schema_version": 99}
    (run / SPLIT).write_text(json.dumps(newer))
    with pytest.raises(RunError, match="schema version 99"):
        read_split(run)


def test_metadata_is_a_typed_versioned_record(contaminated_run: Path, tmp_path: Path) -> None:
    import json

    from llb_edge.runs import METADATA, METADATA_VERSION, RunError, read_metadata, read_split

    written = json.loads((contaminated_run / METADATA).read_text())
    assert written["schema_version"] == METADATA_VERSION
    metadata = read_metadata(contaminated_run)
    assert metadata.to_dict() == written
    assert (metadata.backbone.source, metadata.input.crop, metadata.dataset.name) == ("random", 56, "mtd+alpha0.1")
    assert metadata.calibration_images == len(read_split(contaminated_run).calibration) > 0

    # A record from before versioning: no version, the training paths inline, no calibration slice.
    legacy = {key: value for key, value in written.items()
              if key not in ("schema_version", "calibration_images", "calibration_source")}
    legacy |= {"train_list": "train_list.jsonl", "train_paths": ["/a.png"]}
    (tmp_path / METADATA).write_text(json.dumps(legacy))
    old = read_metadata(tmp_path)
    assert old.backbone == metadata.backbone and old.timing == metadata.timing
    assert (old.calibration_images, old.calibration_source) == (0, "")

    (tmp_path / METADATA).write_text(json.dumps(written | {"schema_version": METADATA_VERSION + 1}))
    with pytest.raises(RunError, match="schema version"):
        read_metadata(tmp_path)
    (tmp_path / METADATA).write_text(json.dumps(written | {"unknown_field": 1}))
    with pytest.raises(RunError, match="not a run metadata record"):
        read_metadata(tmp_path)
