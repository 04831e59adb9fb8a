"""The contamination benchmark: split construction (exact, seeded) and a tiny end-to-end run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import MTD, tiny_overrides

from llb_edge.config import DataConfig, load_config
from llb_edge.data.readers import load_contaminated, load_dataset, realiad_split_dir
from llb_edge.trainer.bench_contamination import run_contamination_bench

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.4])
def test_contaminated_train_has_exactly_int_alpha_n_anomalies_removed_from_test(alpha):
    data = DataConfig(dataset="mtd", root=str(MTD), max_train=40)
    clean = load_dataset(replace(data, max_test=0))
    split = load_contaminated(data, alpha, seed=0)
    moved = [s for s in split.train if s.label == 1]
    assert len(moved) == int(alpha * len(clean.train))
    assert {s.path for s in split.train} == {s.path for s in clean.train} | {s.path for s in moved}
    test_paths = {s.path for s in split.test}
    assert not test_paths & {s.path for s in moved}  # no overlap: moved images left the test split
    assert len(split.test) == len(clean.test) - len(moved)
    # Seeded: the same seed moves the same images, another seed (almost surely) others.
    assert load_contaminated(data, alpha, seed=0) == split
    if moved:
        assert {s.path for s in load_contaminated(data, alpha, seed=1).train} != {s.path for s in split.train}


def test_test_cap_is_applied_after_contamination():
    data = DataConfig(dataset="mtd", root=str(MTD), max_train=40, max_test=12)
    split = load_contaminated(data, 0.4, seed=0)
    assert sum(s.label == 1 for s in split.train) == 16
    assert len(split.test) == 12 and {0, 1} <= {s.label for s in split.test}
    assert not {s.path for s in split.test} & {s.path for s in split.train}


def test_realiad_uses_the_official_fuiad_split_files(tmp_path):
    assert [realiad_split_dir(a) for a in (0, 0.1, 0.2, 0.4)] == [
        "realiad_jsons_fuiad_0.0", "realiad_jsons_fuiad_0.1", "realiad_jsons_fuiad_0.2", "realiad_jsons_fuiad_0.4"]
    (tmp_path / "realiad_1024" / "toy").mkdir(parents=True)
    for alpha, n_bad in ((0.0, 0), (0.2, 1)):
        folder = tmp_path / realiad_split_dir(alpha)
        folder.mkdir()
        train = [{"category": "toy", "anomaly_class": "OK", "image_path": f"ok_{i}.jpg", "mask_path": None}
                 for i in range(4)]
        train += [{"category": "toy", "anomaly_class": "AK", "image_path": f"bad_{i}.jpg",
                   "mask_path": f"bad_{i}.png"} for i in range(n_bad)]
        test = [{"category": "toy", "anomaly_class": "AK", "image_path": "t.jpg", "mask_path": "t.png"}]
        (folder / "toy.json").write_text(json.dumps({"meta": {}, "train": train, "test": test}))
    data = DataConfig(dataset="realiad", root=str(tmp_path), category="toy")
    assert sum(s.label for s in load_contaminated(data, 0.0, seed=0).train) == 0
    assert sum(s.label for s in load_contaminated(data, 0.2, seed=0).train) == 1


def test_tiny_bench_writes_the_tables_and_plots(tmp_path):
    cfg = load_config(None, tiny_overrides(
        tmp_path / "cfg", data__max_train=10, data__max_test=8, train__iterations=3, llb__k=2,
        llb__submodel_iterations=3))
    out = tmp_path / "bench"
    variants = ["none", "default", "fixed", "paper", "oracle"]
    markdown = run_contamination_bench(cfg, alphas=[0.0, 0.2], ks=[1, 2], out_dir=out, variants=variants,
                                       seeds=[0, 1])
    text = markdown.read_text()
    assert "| alpha | variant |" in text and "## k ablation" in text and "## Screening quality" in text
    for alpha in ("0", "0.2"):
        for variant in variants:
            assert f"| {alpha} | {variant} | 2 |" in text  # two seeds per cell
    assert " ± " in text  # mean ± std over the seeds
    paired = text.split("## Paired difference to no screening")[1].split("## Screening quality")[0]
    assert "| 0.2 | default | 2 |" in paired and "| 0 | oracle | 2 | 0.0 ± 0.0 |" in paired
    for png in ("metrics_vs_alpha.png", "dpure_anomaly_fraction.png", "k_ablation.png"):
        assert (out / png).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    cells = {(c["seed"], c["alpha"], c["variant"]): c for c in results["cells"]}
    assert len(cells) == 2 * 2 * len(variants)
    none = cells[(0, 0.2, "none")]
    assert none["train_anomalies"] == 2 and none["trained_on"] == 12
    # The paper's cut drops 60% of the images; the default keeps every image (suspects are masked).
    assert cells[(0, 0.2, "fixed")]["trained_on"] == 4 and cells[(0, 0.2, "paper")]["trained_on"] == 4
    assert cells[(0, 0.2, "default")]["trained_on"] == 12
    assert (cells[(0, 0.2, "oracle")]["trained_on"], cells[(0, 0.2, "oracle")]["trained_on_anomalies"]) == (10, 0)
    assert cells[(0, 0.2, "paper")]["screening"]["submodel"] == "dinomaly"
    assert cells[(0, 0.2, "default")]["screening"]["submodel"] == "knn"
    assert cells[(0, 0.2, "default")]["screening_auroc"] is not None and "i_auroc" in none["metrics"]
    # Seeds change the planted defects.
    seed_paths = [json.loads((out / f"seed_{s}" / "alpha_0.2" / "default" / "stage1" / "subsets.json").read_text())
                  for s in (0, 1)]
    assert seed_paths[0] != seed_paths[1]
    assert [(r["alpha"], r["k"]) for r in results["k_ablation"]] == [(0.2, 1), (0.2, 2)]
    assert all(len(r["single_anomalous_kept"]) == r["k"] for r in results["k_ablation"])
    # Called again, the bench reads every finished piece back instead of training it again.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    run_contamination_bench(cfg, alphas=[0.0, 0.2], ks=[1, 2], out_dir=out, variants=variants, seeds=[0, 1])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == before
