"""LLB stage 1: the selection pinned on crafted data, resume, cache parity, knn, report artifacts."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from llb_edge.config import load_config
from llb_edge.data.samples import Sample, load_sample_list
from llb_edge.models.dinomaly import AnomalyScorer, EncoderFeatures
from llb_edge.runs import RunError
from llb_edge.trainer import llb, screening_report, submodels
from llb_edge.trainer.llb import keep_count, screen, subset_positions

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ test doubles


def crafted_score(path: str, index: int) -> float:
    """A fake sub-model's score: a per-path base plus a per-(path, sub-model) offset, no RNG state."""
    base = zlib.crc32(path.encode()) % 1000 / 100.0
    offset = zlib.crc32(f"{path}#{index}".encode()) % 1000 / 300.0
    return base + offset


class FakeSubModel(submodels.SubModel):
    """Scores are a fixed function of (path, sub-model index); records what it was asked to do."""

    kind = "fake"
    calls: list[tuple[int, list[int], list[int]]] = []  # (index, fitted positions, scored positions)
    paths: list[str] = []  # the training paths, in sample order

    def fit(self, positions: np.ndarray, resume: bool) -> dict:
        self.fitted = positions.tolist()
        return {"seconds": 0.0}

    def score(self, positions: np.ndarray) -> np.ndarray:
        FakeSubModel.calls.append((self.index, self.fitted, positions.tolist()))
        return np.asarray([crafted_score(self.paths[p], self.index) for p in positions])

    def anomaly_maps(self, positions: np.ndarray) -> np.ndarray:
        return np.zeros((len(positions), 64, 64), np.float32)

    def patch_scores(self, positions: np.ndarray) -> np.ndarray:
        """One hot patch per image at (1, 2) holding the image's score: the rest scores 0."""
        scores = np.zeros((len(positions), 4, 4), np.float32)
        scores[:, 1, 2] = [crafted_score(self.paths[p], self.index) for p in positions]
        return scores

    def save(self) -> None:
        (self.directory / "fake.txt").write_text("weights")

    def load(self) -> None:
        assert (self.directory / "fake.txt").is_file()


class StubFeatures:
    """Just what stage 1 reads from EncodedImages: images, device, length (and batch for knn)."""

    def __init__(self, n: int, groups: list[torch.Tensor] | None = None) -> None:
        self.images = np.random.default_rng(0).integers(0, 255, (n, 56, 56, 3), dtype=np.uint8)
        self.device = torch.device("cpu")
        self.groups = groups

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: np.ndarray) -> EncoderFeatures:
        index = torch.as_tensor(indices, dtype=torch.long)
        return EncoderFeatures(fused=torch.zeros(len(index), 1, 1), groups=[g[index] for g in self.groups])


def fake_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int = 37, k: int = 4, keep: float | str = 0.3,
    above_cut: str = "drop",
):
    monkeypatch.setitem(submodels.SUBMODELS, "fake", FakeSubModel)
    FakeSubModel.calls = []
    cfg = load_config(None, tiny_overrides(tmp_path / "run", llb__k=k, llb__keep=keep, llb__above_cut=above_cut))
    cfg.llb.submodel = "fake"  # not a config choice: set after validation
    # Paths in a scrambled order, so that positions, subset order and path order all differ.
    order = np.random.default_rng(5).permutation(n)
    samples = [Sample(f"/fake/img_{i:03d}.png", 1 if i % 9 == 0 else 0,
                      defect_type="crafted" if i % 9 == 0 else "good") for i in order]
    FakeSubModel.paths = [s.path for s in samples]
    return cfg, samples, StubFeatures(n)


def run_fake(cfg, samples, features, stage_dir: Path, resume: bool = False):
    return screen(cfg, None, features, samples, stage_dir, resume, AnomalyScorer(56, 64))


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------ tests


def test_subsets_are_disjoint_cover_everything_and_are_seeded():
    parts = subset_positions(23, 5, seed=3)
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(23))  # disjoint and covering
    assert {len(p) for p in parts} <= {4, 5}
    assert all(np.array_equal(a, b) for a, b in zip(parts, subset_positions(23, 5, seed=3), strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(parts, subset_positions(23, 5, seed=4), strict=True))
    with pytest.raises(ValueError, match="at least"):
        subset_positions(3, 5, seed=0)


def test_keep_count_is_floor_of_n_times_t():
    assert keep_count(37, 0.3) == 11
    assert keep_count(100, 0.29) == 29  # 100 * 0.29 is 28.999999999999996 in floating point
    assert keep_count(10, 0.4) == 4
    assert keep_count(24, 1.0) == 24
    assert keep_count(3, 0.1) == 1  # never an empty D_pure


def test_selection_is_exactly_the_lowest_by_path(tmp_path, monkeypatch):
    cfg, samples, features = fake_setup(tmp_path, monkeypatch)
    stage_dir = tmp_path / "run" / "stage1"
    result = run_fake(cfg, samples, features, stage_dir)
    n, k = len(samples), cfg.llb.k
    paths = [s.path for s in samples]

    # Disjoint subsets covering all images; each sub-model fitted on its own subset only.
    fitted = {index: set(fit) for index, fit, _ in FakeSubModel.calls}
    assert sorted(fitted) == list(range(k))
    assert sum(len(f) for f in fitted.values()) == n and set().union(*fitted.values()) == set(range(n))
    listed = json.loads((stage_dir / "subsets.json").read_text())["subsets"]
    assert [sorted(paths[p] for p in fitted[j]) for j in range(k)] == [sorted(part) for part in listed]
    # Every sub-model scored every training image, its own subset included.
    assert all(sorted(scored) == list(range(n)) for _, _, scored in FakeSubModel.calls)

    # Recompute the selection from the per-image table alone, and independently from the formula.
    rows = read_table(stage_dir / "scores.csv")
    assert len(rows) == n and {r["path"] for r in rows} == set(paths)
    for row in rows:
        per_model = [float(row[f"score_{j}"]) for j in range(k)]
        assert per_model == pytest.approx([crafted_score(row["path"], j) for j in range(k)], abs=1e-12)
        assert float(row["mean"]) == pytest.approx(np.mean(per_model), abs=1e-12)
    count = math.floor(n * cfg.llb.keep_fraction)
    lowest = sorted(rows, key=lambda r: (float(r["mean"]), r["path"]))[:count]
    expected = {r["path"] for r in lowest}
    independent = sorted(paths, key=lambda p: (np.mean([crafted_score(p, j) for j in range(k)]), p))[:count]
    assert expected == set(independent)
    assert {r["path"] for r in rows if r["status"] == "kept"} == expected
    assert set(result.kept) == expected and len(result.kept) == count
    # The returned positions point at exactly those paths in the caller's sample order.
    assert {samples[i].path for i in result.kept_positions} == expected
    assert list(result.kept_positions) == sorted(result.kept_positions)
    assert {s.path for s in load_sample_list(stage_dir / "purified.jsonl")} == expected

    # Labels known: the anomaly fraction before and after screening is reported.
    s = result.summary
    anomalous = {x.path for x in samples if x.label == 1}
    assert s["anomalies_before"] == len(anomalous)
    assert s["anomaly_fraction_before"] == pytest.approx(len(anomalous) / n)
    assert s["anomaly_fraction_after"] == pytest.approx(len(anomalous & expected) / count)
    page = (stage_dir / "report.html").read_text()
    assert "anomaly fraction before screening" in page and "anomaly fraction after screening" in page
    # The report references only files that exist, and shows the removed images.
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert {"score_histogram.png", "subset_counts.png", "scores.csv", "purified.jsonl"} <= set(refs)
    assert all((stage_dir / ref).is_file() for ref in refs)
    assert sum(ref.startswith("removed/") for ref in refs) == screening_report.REPORT_REMOVED


def test_resume_reuses_finished_submodels_and_refuses_other_subsets(tmp_path, monkeypatch):
    cfg, samples, features = fake_setup(tmp_path, monkeypatch)
    stage_dir = tmp_path / "run" / "stage1"
    first = run_fake(cfg, samples, features, stage_dir)
    # Interrupted during sub-model 2: its scores were never written (sub-models 3 and on neither).
    for j in (2, 3):
        (stage_dir / f"submodel_{j}" / "scores.json").unlink()
    FakeSubModel.calls = []
    again = run_fake(cfg, samples, features, stage_dir, resume=True)
    assert sorted(index for index, _, _ in FakeSubModel.calls) == [2, 3]
    assert again.kept == first.kept and again.table.scores == first.table.scores

    cfg.llb.seed = 1  # other subsets: resuming would mix two screenings
    with pytest.raises(RunError, match="other subsets"):
        run_fake(cfg, samples, features, stage_dir, resume=True)


def tiny_real(tmp_path: Path, n_train: int = 12, **extra):
    """A tiny real setup: MTD images, the tiny random encoder, features built by the caller."""
    from llb_edge.data.readers import load_dataset
    from llb_edge.data.transforms import Geometry
    from llb_edge.models.dinomaly import create_dinomaly
    from llb_edge.trainer.features import load_model_inputs
    from llb_edge.trainer.pipeline import make_scorer

    cfg = load_config(None, tiny_overrides(tmp_path / "run", data__max_train=n_train, **extra))
    samples = load_dataset(cfg.data).train
    torch.manual_seed(0)
    model, _ = create_dinomaly(cfg.model.encoder, cfg.data.crop, "random")
    images = load_model_inputs(samples, Geometry(cfg.data.resize, cfg.data.crop))
    return cfg, samples, model, images, make_scorer(cfg)


def test_interrupted_dinomaly_submodel_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from llb_edge.trainer.features import EncodedImages

    cfg, samples, model, images, scorer = tiny_real(tmp_path, n_train=9, llb__k=3, llb__submodel="dinomaly",
                                                    llb__submodel_iterations=4,
                                                    train__checkpoint_every=2)
    features = EncodedImages(model, images, torch.device("cpu"))
    reference = screen(cfg, model.encoder, features, samples, tmp_path / "straight", False, scorer)

    real_train = submodels.train_dinomaly
    seen: list[tuple[str, bool]] = []

    def interrupted(model, features, indices, cfg_train, iterations, seed, checkpoint, **kw):
        if checkpoint.parent.name == "submodel_1":  # killed after 2 of its 4 iterations
            real_train(model, features, indices, cfg_train, 2, seed, checkpoint, **kw)
            raise KeyboardInterrupt
        return real_train(model, features, indices, cfg_train, iterations, seed, checkpoint, **kw)

    monkeypatch.setattr(submodels, "train_dinomaly", interrupted)
    stage_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        screen(cfg, model.encoder, features, samples, stage_dir, False, scorer)
    assert (stage_dir / "submodel_0" / "scores.json").is_file()
    assert (stage_dir / "submodel_1" / "checkpoint.safetensors").is_file()

    def recording(model, features, indices, cfg_train, iterations, seed, checkpoint, **kw):
        seen.append((checkpoint.parent.name, checkpoint.is_file()))
        return real_train(model, features, indices, cfg_train, iterations, seed, checkpoint, **kw)

    monkeypatch.setattr(submodels, "train_dinomaly", recording)
    resumed = screen(cfg, model.encoder, features, samples, stage_dir, True, scorer)
    # Sub-model 0 was reused, 1 continued from its checkpoint, 2 started fresh.
    assert seen == [("submodel_1", True), ("submodel_2", False)]
    assert not (stage_dir / "submodel_1" / "checkpoint.safetensors").exists()  # replaced by the weights
    for path in reference.table.paths:
        assert resumed.table.scores[path] == pytest.approx(reference.table.scores[path], rel=1e-5, abs=1e-6)
    assert resumed.kept == reference.kept


@pytest.mark.parametrize("kind", ["dinomaly", "knn"])
def test_cached_and_uncached_features_give_the_same_stage1_scores(tmp_path, kind):
    from llb_edge.trainer.features import EncodedImages

    cfg, samples, model, images, scorer = tiny_real(tmp_path, n_train=10, llb__k=2, llb__submodel=kind,
                                                    llb__submodel_iterations=4, train__cache_location="disk")
    cpu = torch.device("cpu")
    variants = {
        "uncached": EncodedImages(model, images, cpu, cached=False, batch_size=4),
        "fp32": EncodedImages(model, images, cpu, batch_size=4),
        "fp16_disk": EncodedImages.from_config(model, images, cpu, cfg.train, spill_dir=tmp_path / "spill"),
    }
    assert variants["fp16_disk"].location == "disk"
    assert any((tmp_path / "spill").rglob("*.npy"))
    tables = {name: screen(cfg, model.encoder, f, samples, tmp_path / name, False, scorer).table.scores
              for name, f in variants.items()}
    reference = np.asarray([tables["uncached"][s.path] for s in samples])
    fp32 = np.asarray([tables["fp32"][s.path] for s in samples])
    fp16 = np.asarray([tables["fp16_disk"][s.path] for s in samples])
    np.testing.assert_allclose(fp32, reference, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fp16, reference, rtol=5e-3, atol=5e-4)  # measured: 4e-4 relative
    del variants
    import gc

    gc.collect()
    assert not any((tmp_path / "spill").rglob("*.npy"))  # the spill file goes with its cache


def test_knn_submodel_removes_crafted_outliers_with_a_bounded_bank(tmp_path, monkeypatch):
    """Crafted patch features: normal images share one direction, three images carry unique defects."""
    n, grid, dim = 20, 4, 8
    rng = np.random.default_rng(0)
    groups = []
    for _ in range(2):
        g = np.tile(np.eye(dim)[0], (n, grid * grid, 1)) + 0.01 * rng.standard_normal((n, grid * grid, dim))
        for image, direction in ((3, 1), (11, 2), (17, 3)):  # two defect patches, in its own direction
            g[image, :2] = np.eye(dim)[direction]
        groups.append(torch.tensor(g, dtype=torch.float32).transpose(1, 2).reshape(n, dim, grid, grid))
    features = StubFeatures(n, groups)
    encoder = type("Encoder", (), {"grid": grid})()
    cfg = load_config(None, tiny_overrides(tmp_path / "run", llb__k=2, llb__keep=0.5, llb__submodel="knn",
                                           llb__knn_bank_size=100))
    samples = [Sample(f"/crafted/{i:02d}.png", 1 if i in (3, 11, 17) else 0) for i in range(n)]
    result = screen(cfg, encoder, features, samples, tmp_path / "stage1", False, AnomalyScorer(56, 64))
    ranked = sorted(result.consensus, key=result.consensus.get)
    assert set(ranked[-3:]) == {samples[i].path for i in (3, 11, 17)}
    assert result.summary["anomalies_after"] == 0 and len(result.kept) == 10
    bank = submodels.load_file(str(tmp_path / "stage1" / "submodel_0" / "bank.safetensors"))
    assert len(bank["bank_image"]) == 100  # 10 images x 16 patches = 160, subsampled to the bound
    # Leave-one-image-out: an own-subset image is not matched against its own patches.
    own = [p for p, j in result.table.subset.items() if j == 0]
    assert all(result.table.scores[p][0] > 0 for p in own)
    # Chunked distances (here one image per chunk) give the same scores as one big chunk, up to
    # the ~1e-5 absolute rounding of cdist's matmul form (|x|^2 + |y|^2 - 2xy) for close vectors.
    monkeypatch.setattr(submodels, "CDIST_ELEMENTS", 100 * grid * grid)
    ctx = submodels.Stage1Context(cfg, encoder, features, AnomalyScorer(56, 64))
    sub = submodels.KnnSubModel(ctx, 0, llb.submodel_seed(cfg.llb.seed, 0), tmp_path / "stage1" / "submodel_0")
    sub.load()
    np.testing.assert_allclose(sub.score(np.arange(n)), [result.table.scores[s.path][0] for s in samples],
                               atol=2e-5)


def test_default_stage1_end_to_end_through_train(tmp_path):
    """The product default (knn sub-models, automatic cut, suspects masked) through `train`, with
    a low outlier_z so the tiny set has suspects whose patches get masked."""
    from safetensors.torch import load_file

    from llb_edge.trainer.pipeline import run_training

    run_dir = run_training(load_config(None, tiny_overrides(
        tmp_path / "knn", llb__stages="1,2", llb__outlier_z=0.5, train__iterations=4)), evaluate_after=False)
    metadata = json.loads((run_dir / "metadata.json").read_text())
    screening = metadata["screening"]
    assert (screening["submodel"], screening["keep"], screening["above_cut"]) == ("knn", "auto", "mask")
    # The calibration slice (half of the 24 here: calibration_min 20, at most half) is held back
    # before stage 1: neither the screening nor the final model sees it.
    assert metadata["calibration_source"] == "training" and metadata["calibration_images"] == 12
    assert screening["images"] == 12 and screening["removed"] > 0
    assert screening["kept"] + screening["removed"] == 12
    assert screening["estimated_contamination"] == pytest.approx(screening["removed"] / 12)
    calibration = set(json.loads((run_dir / "calibration_scores.json").read_text())["scores"])
    screened = {row.split(",")[1] for row in (run_dir / "stage1" / "scores.csv").read_text().splitlines()[1:]}
    assert len(calibration) == 12 and not calibration & screened and len(screened) == 12
    # Ranked for review: highest score first, every suspect above the cut.
    suspects = screening["suspects"]
    assert [s["score"] for s in suspects] == sorted((s["score"] for s in suspects), reverse=True)
    assert all(s["score"] > screening["threshold"] for s in suspects) and len(suspects) == screening["removed"]
    # Masking keeps every image; the suspects' masks are stored, and some patches really are out.
    purified = load_sample_list(run_dir / "stage1" / "purified.jsonl")
    assert purified == load_sample_list(run_dir / "train_list.jsonl") and len(purified) == 12
    masks = load_file(str(run_dir / "stage1" / "patch_masks.safetensors"))
    assert len(masks["positions"]) == screening["removed"] and (masks["keep"] == 0).any()
    assert 0 < screening["masked_patch_fraction"] < 1

    # "kept": the slice is drawn after screening, from the images below the cut only (the paper's
    # cut here: floor(24 * 0.4) = 9 images, of which at most half is held back).
    kept_run = run_training(load_config(None, tiny_overrides(
        tmp_path / "kept", llb__stages="1,2", llb__keep=0.4, llb__above_cut="drop", train__iterations=4,
        train__calibration_source="kept", llb__keep_submodel_weights=True)), evaluate_after=False)
    purified = {s.path for s in load_sample_list(kept_run / "stage1" / "purified.jsonl")}
    trained = {s.path for s in load_sample_list(kept_run / "train_list.jsonl")}
    calibration = set(json.loads((kept_run / "calibration_scores.json").read_text())["scores"])
    assert len(purified) == 9 and len(calibration) == 4 and calibration | trained == purified
    assert not calibration & trained
    page = (run_dir / "stage1" / "report.html").read_text()
    assert "Suspects, ranked for review" in page and Path(suspects[0]["path"]).name in page
    refs = re.findall(r'src="([^"]+\.png)"', page)
    assert refs and all((run_dir / "stage1" / ref).is_file() for ref in refs)

    # A complete run keeps no checkpoint and, unless asked to, no sub-model weights (docs/runs.md);
    # each sub-model's scores stay, they are the screening's record.
    for run, weights_kept in ((run_dir, False), (kept_run, True)):
        assert not (run / "checkpoint.safetensors").exists() and (run / "model.safetensors").is_file()
        for j in range(3):
            assert (run / "stage1" / f"submodel_{j}" / "scores.json").is_file()
            assert (run / "stage1" / f"submodel_{j}" / "bank.safetensors").is_file() == weights_kept


def test_run_interrupted_after_stage1_resumes_then_drops_what_only_resume_needed(tmp_path, monkeypatch):
    """Killed in stage 2: the resumed run enters stage 1 again, which reads the sub-models' banks
    (suspect patch masks, report), so they must outlive stage 1; once complete, both they and the
    checkpoint go, and a complete run refuses --resume (it would train stage 2 afresh)."""
    from llb_edge.trainer import pipeline

    cfg = load_config(None, tiny_overrides(tmp_path / "run", llb__stages="1,2", llb__outlier_z=0.5,
                                           train__iterations=4))
    real_train = pipeline.train_dinomaly

    def killed_after_training(*args, **kwargs):
        real_train(*args, **kwargs)
        raise KeyboardInterrupt("killed after the last checkpoint")

    monkeypatch.setattr(pipeline, "train_dinomaly", killed_after_training)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_training(cfg, evaluate_after=False)
    stage_dir = cfg.run_dir / "stage1"
    assert (cfg.run_dir / "checkpoint.safetensors").is_file() and not (cfg.run_dir / "metadata.json").exists()
    assert all((stage_dir / f"submodel_{j}" / "bank.safetensors").is_file() for j in range(3))

    monkeypatch.setattr(pipeline, "train_dinomaly", real_train)
    run_dir = pipeline.run_training(cfg, resume=True, evaluate_after=False)
    assert json.loads((run_dir / "metadata.json").read_text())["screening"]["removed"] > 0  # masks were rebuilt
    assert not (run_dir / "checkpoint.safetensors").exists()
    assert not any(stage_dir.rglob("bank.safetensors"))
    with pytest.raises(RunError, match="complete: nothing to resume"):
        pipeline.run_training(cfg, resume=True, evaluate_after=False)


def test_automatic_cut_keeps_a_clean_set_and_removes_clear_outliers():
    rng = np.random.default_rng(1)
    clean = {f"n{i}": float(v) for i, v in enumerate(rng.normal(1.0, 0.1, 300))}
    kept, cut = llb.cut_ranking(clean, None, outlier_z=2.5)
    assert len(kept) >= 0.98 * len(clean)  # a Gaussian tail beyond 2.5 sigma is ~0.6%
    dirty = {**clean, **{f"a{i}": 3.0 + i for i in range(30)}}
    kept, cut = llb.cut_ranking(dirty, None, outlier_z=2.5)
    assert not any(p.startswith("a") for p in kept) and len(kept) >= 0.98 * len(clean)
    assert kept == sorted(kept, key=lambda p: dirty[p])  # lowest first
    # A fixed fraction ignores the data: the paper's 0.4 drops 60% of a clean set.
    kept, cut = llb.cut_ranking(clean, 0.4, outlier_z=2.5)
    assert len(kept) == 120 and cut == clean[kept[-1]]


def test_suspect_patch_mask_dilates_by_one_patch():
    scores = np.zeros((2, 5, 5), np.float32)
    scores[0, 0, 0] = 2.0  # a corner patch above the cut
    scores[0, 3, 3] = 1.0  # exactly at the cut: stays in
    keep = llb.suspect_patch_mask(scores, cut=1.0)
    expected = np.ones((5, 5), bool)
    expected[0:2, 0:2] = False
    assert (keep[0] == expected).all() and keep[1].all()


def test_masked_points_neither_count_nor_get_gradient():
    from llb_edge.trainer.loss import global_cosine_hm_loss

    torch.manual_seed(0)
    enc = [torch.randn(2, 8, 4, 4)]
    dec = torch.randn(2, 8, 4, 4, requires_grad=True)
    weights = torch.ones(2, 4, 4)
    weights[0, 1, 2] = 0
    loss = global_cosine_hm_loss(enc, [dec], p=0.0, point_weights=weights)
    loss.backward()
    assert dec.grad[0, :, 1, 2].abs().max() == 0 and dec.grad[0, :, 1, 1].abs().max() > 0
    # Whatever the decoder puts at a masked point, the loss does not change.
    changed = dec.detach().clone()
    changed[0, :, 1, 2] = 100.0
    assert global_cosine_hm_loss(enc, [changed], p=0.0, point_weights=weights).item() == pytest.approx(loss.item())
    # All-ones weights are the plain loss.
    plain = global_cosine_hm_loss(enc, [dec.detach()], p=0.0)
    assert global_cosine_hm_loss(enc, [dec.detach()], p=0.0, point_weights=torch.ones(2, 4, 4)).item() == (
        pytest.approx(plain.item()))


def test_masking_keeps_every_image_and_masks_only_suspect_patches(tmp_path, monkeypatch):
    cfg, samples, features = fake_setup(tmp_path, monkeypatch, keep="auto", above_cut="mask")
    cfg.llb.outlier_z = 1.0
    result = run_fake(cfg, samples, features, tmp_path / "run" / "stage1")
    suspects = [i for i, s in enumerate(samples) if s.path not in set(result.kept)]
    assert suspects and list(result.kept_positions) == list(range(len(samples)))
    weights = result.loss_weights
    assert weights.shape == (len(samples), 4, 4)
    others = [i for i in range(len(samples)) if i not in suspects]
    assert (weights[others] == 1).all()
    # The fake's hot patch (1, 2) carries the image score: above the cut for every suspect, so it
    # and its 3x3 neighbourhood are out; the far corner stays in.
    assert (weights[suspects][:, 0:3, 1:4] == 0).all() and (weights[suspects][:, 3, 0] == 1).all()
    assert result.summary["estimated_contamination"] == pytest.approx(len(suspects) / len(samples))


def _train_in_subprocess(launcher: list[str], run_dir, **extra) -> subprocess.CompletedProcess:
    overrides = tiny_overrides(run_dir, llb__stages="1,2", train__iterations=2, **extra)
    command = [*launcher, "llb_edge.cli", "train", "--no-eval", *(a for o in overrides for a in ("--set", o))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(600)
def test_torchrun_spreads_submodels_over_ranks_and_selects_the_same_images(tmp_path):
    # Two CPU ranks under the real torchrun launcher against one process: sub-models j % 2 == rank,
    # scores exchanged through the run directory, identical selection and scores.
    single = _train_in_subprocess([sys.executable, "-m"], tmp_path / "single")
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    ranks = _train_in_subprocess(launcher, tmp_path / "ranks")
    assert ranks.returncode == 0, ranks.stderr[-3000:]

    for j in range(3):
        single_scores = json.loads((tmp_path / "single" / "stage1" / f"submodel_{j}" / "scores.json").read_text())
        rank_scores = json.loads((tmp_path / "ranks" / "stage1" / f"submodel_{j}" / "scores.json").read_text())
        assert (single_scores["rank"], rank_scores["rank"]) == (0, j % 2)
        assert rank_scores["scores"].keys() == single_scores["scores"].keys()
        np.testing.assert_allclose(list(rank_scores["scores"].values()), list(single_scores["scores"].values()),
                                   rtol=1e-5)
    assert (load_sample_list(tmp_path / "ranks" / "stage1" / "purified.jsonl")
            == load_sample_list(tmp_path / "single" / "stage1" / "purified.jsonl"))
    assert (tmp_path / "ranks" / "model.safetensors").is_file()  # rank 0 went on to stage 2
