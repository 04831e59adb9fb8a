"""LLB stage 1: contamination-resistant screening of the training set (method.md section 2).

1. Shuffle the N training positions (seeded by ``llb.seed``) and cut them into k disjoint subsets
   that together cover every image.
2. Fit a fresh sub-model on each subset (seed derived from ``llb.seed`` and the subset index).
3. Every sub-model scores EVERY training image, its own subset included.
4. Consensus score = plain mean of the k raw scores (no per-model normalisation).
5. Cut the ranking. ``llb.keep = 0.4`` (the paper): keep the floor(N * keep) lowest consensus
   scores. ``llb.keep = "auto"`` (the default): the cut is the median plus ``llb.outlier_z`` robust
   standard deviations, the scale taken from the scores below the median (the clean side of the
   distribution: contamination only ever adds to the upper tail). Images above the cut are the
   suspects; their share is reported as the estimated contamination.
6. Suspects leave D_pure (``llb.above_cut = "drop"``, the paper), or stay with their suspect patches
   masked out of the stage-2 loss (``"mask"``, the default): a patch is suspect when its consensus
   patch score (the mean of the sub-models' patch scores) lies above the cut, dilated by one patch.
   A defect is a few patches of an otherwise normal image; dropping the image throws the rest away.

Everything is keyed by image path: each sub-model's scores are written as ``{path: score}``, the
score table is a dict path -> k scores, the selection sorts paths, and positions into the sample
list are looked up from the selected paths at the very end. There is no second index space in
which a permutation could be applied twice (the bug of the released reference code).

Artifacts under ``<run>/stage1/``::

    subsets.json              the subsets, as lists of paths (checked again on resume)
    submodel_<j>/scores.json  sub-model j's score for every training image (written last: its
                              presence marks the sub-model as finished)
    submodel_<j>/model.safetensors | bank.safetensors   its weights (Dinomaly) or bank (knn); deleted
                              when the run completes unless llb.keep_submodel_weights
    submodel_<j>/checkpoint.safetensors, train_log.jsonl   while a Dinomaly sub-model trains
    scores.csv                per image: rank, path, label, subset, score per sub-model, mean, kept | suspect
    purified.jsonl            D_pure as a sample list
    patch_masks.safetensors   above_cut = mask: the suspects' positions and their loss masks
    summary.json              what run_stage1 returns (also stored in metadata.json by the pipeline)
    report.html + *.png       the screening report (trainer/screening_report.py); removed/ holds
                              the image + map panels

An interrupted run resumes at the sub-model where it stopped: finished sub-models are read back
from their scores.json, the one in progress continues from its own training checkpoint.

Multi-GPU: under torchrun (RANK / WORLD_SIZE set), rank r fits the sub-models j with
j % WORLD_SIZE == r and all ranks then read every sub-model's scores.json from the shared run
directory (waiting for the others' files). Rank 0 alone writes the table and the report; every rank
returns the same selection. This path is written against torchrun's documented environment and
is tested on CPU with two ranks under the real torchrun launcher (tests/test_llb.py), not on
several GPUs; one process (CPU or one GPU) never needs torchrun.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from llb_edge.calibration import RobustScale
from llb_edge.config import RunConfig
from llb_edge.data.samples import ANOMALOUS, UNKNOWN, Sample, save_sample_list
from llb_edge.metrics import image_metrics
from llb_edge.models.dinomaly import AnomalyScorer, DinoEncoder
from llb_edge.runs import STAGE1, RunError, read_json, write_json
from llb_edge.trainer.features import EncodedImages
from llb_edge.trainer.screening_report import REPORT, write_report
from llb_edge.trainer.submodels import (
    SUBMODELS,
    Stage1Context,
    SubModel,
    concurrent_workers,
    create_submodel,
    run_on_streams,
)

log = logging.getLogger(__name__)

SUBSETS = "subsets.json"
SCORES = "scores.json"
TABLE = "scores.csv"
PURIFIED = "purified.jsonl"
SUMMARY = "summary.json"
PATCH_MASKS = "patch_masks.safetensors"
RANK_WAIT_SECONDS = 6 * 3600  # torchrun: how long a rank waits for another rank's sub-model scores


# ------------------------------------------------------------------------------- the method itself


def subset_positions(n: int, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint subsets of range(n) covering it, sizes differing by at most one (seeded)."""
    if k > n:
        raise ValueError(f"llb.k = {k} subsets need at least {k} training images; got {n}")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, k)]


def submodel_seed(seed: int, index: int) -> int:
    """Sub-model j's seed: a function of (llb.seed, j) only, independent across j."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def keep_count(n: int, keep: float) -> int:
    """floor(N * keep), at least 1. The epsilon keeps e.g. 100 * 0.29 (28.999999999999996) at 29."""
    return max(1, math.floor(n * keep + 1e-9))


def select_lowest(consensus: dict[str, float], count: int) -> list[str]:
    """The ``count`` paths with the lowest consensus score, lowest first; ties broken by path."""
    return sorted(consensus, key=lambda path: (consensus[path], path))[:count]


def automatic_cut(consensus: dict[str, float], outlier_z: float) -> float:
    """The consensus score above which an image is a suspect: median + outlier_z robust sigmas."""
    return RobustScale.of(consensus.values()).above(outlier_z)


def cut_ranking(consensus: dict[str, float], keep: float | None, outlier_z: float) -> tuple[list[str], float]:
    """(paths at or below the cut, lowest first; the cut). ``keep`` None: the automatic cut."""
    if keep is not None:
        kept = select_lowest(consensus, keep_count(len(consensus), keep))
        return kept, consensus[kept[-1]]
    cut = automatic_cut(consensus, outlier_z)
    ranked = select_lowest(consensus, len(consensus))
    return [p for p in ranked if consensus[p] <= cut], cut


def suspect_patch_mask(patch_scores: np.ndarray, cut: float) -> np.ndarray:
    """bool [B, grid, grid]: True where a patch stays in the loss (score at or below the cut, and no
    suspect neighbour: the dilation covers the fringe of a defect whose score falls just under it)."""
    suspect = torch.from_numpy(np.asarray(patch_scores, np.float32) > cut).float()[:, None]
    dilated = F.max_pool2d(suspect, kernel_size=3, stride=1, padding=1)[:, 0]
    return (dilated == 0).numpy()


@dataclass
class ScreeningTable:
    """Every sub-model's raw score for every training image, keyed by path."""

    paths: list[str]  # training-sample order
    subset: dict[str, int]  # path -> the subset (and sub-model) it was fitted in
    scores: dict[str, list[float]]  # path -> [score of sub-model 0, ..., score of sub-model k-1]

    def consensus(self) -> dict[str, float]:
        return {path: float(np.mean(values)) for path, values in self.scores.items()}

    def single(self, index: int) -> dict[str, float]:
        """One sub-model's scores alone (the paper's Figure 4 compares them with the consensus)."""
        return {path: values[index] for path, values in self.scores.items()}


@dataclass
class Stage1Result:
    table: ScreeningTable
    consensus: dict[str, float]
    kept: list[str]  # at or below the cut, lowest consensus first
    kept_positions: np.ndarray  # what stage 2 trains on, as positions into the sample list, ascending
    summary: dict[str, Any]
    # above_cut = mask: float [N, grid, grid] over all positions, 0 where a patch is left out of the
    # stage-2 loss; None when nothing is masked.
    loss_weights: torch.Tensor | None = None


# ------------------------------------------------------------------------------ running sub-models


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (torchrun's environment; 0, 1 otherwise)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_primary_rank() -> bool:
    """False on torchrun ranks > 0, which only fit sub-models: the pipeline should stop them after stage 1."""
    return rank_and_world()[0] == 0


def submodel_dir(stage_dir: Path, index: int) -> Path:
    return stage_dir / f"submodel_{index}"


def record_subsets(path: Path, subsets: list[np.ndarray], paths: list[str], resume: bool) -> None:
    """Write the subsets as path lists; on resume, refuse to continue with different ones."""
    listed = [[paths[p] for p in part] for part in subsets]
    if resume and path.is_file():
        if read_json(path)["subsets"] != listed:
            raise RunError(
                f"{path} holds other subsets than this run would build: the training set, llb.k or "
                "llb.seed changed since the interrupted run; start a new run instead of --resume"
            )
        return
    write_json(path, {"subsets": listed})


def read_finished(stage_dir: Path, index: int, paths: list[str], kind: str) -> dict[str, float] | None:
    """Sub-model ``index``'s scores if it finished (scores.json is written last), else None."""
    path = submodel_dir(stage_dir, index) / SCORES
    if not path.is_file():
        return None
    record = read_json(path)
    if record["kind"] != kind:
        raise RunError(f"{path} was written by a {record['kind']} sub-model, this run uses {kind}")
    if set(record["scores"]) != set(paths):
        raise RunError(f"{path} does not score exactly this run's training images; start a new run")
    return {p: float(v) for p, v in record["scores"].items()}


def fit_and_score(sub: SubModel, positions: np.ndarray, paths: list[str], resume: bool) -> None:
    """Fit one sub-model on its subset, score every training image, persist weights then scores."""
    fit = sub.fit(positions, resume)
    t0 = time.perf_counter()
    scores = sub.score(np.arange(len(paths)))
    score_seconds = time.perf_counter() - t0
    sub.directory.mkdir(parents=True, exist_ok=True)
    sub.save()
    write_json(sub.directory / SCORES, {
        "submodel": sub.index, "kind": sub.kind, "seed": sub.seed, "subset_size": int(len(positions)),
        "rank": rank_and_world()[0],
        "fit": fit, "score_seconds": score_seconds,
        "scores": {path: float(value) for path, value in zip(paths, scores, strict=True)},
    })


def wait_for_scores(stage_dir: Path, index: int, paths: list[str], kind: str) -> dict[str, float]:
    """Another rank's sub-model: poll for its scores.json (torchrun only)."""
    deadline = time.monotonic() + RANK_WAIT_SECONDS
    while (scores := read_finished(stage_dir, index, paths, kind)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"sub-model {index} did not finish within {RANK_WAIT_SECONDS} s on its rank")
        time.sleep(5)
    return scores


# ------------------------------------------------------------------------------------- the stage


def screen(
    cfg: RunConfig,
    encoder: DinoEncoder,
    features: EncodedImages,
    samples: list[Sample],
    stage_dir: Path,
    resume: bool,
    scorer: AnomalyScorer,
) -> Stage1Result:
    """Stage 1 on ``samples`` (whose features ``features`` holds, in the same order)."""
    t0 = time.perf_counter()
    llb = cfg.llb
    paths = [s.path for s in samples]
    if len(set(paths)) != len(paths):
        raise ValueError("the training set lists an image path twice; stage 1 keys every score by path")
    if len(features) != len(samples):
        raise ValueError(f"features hold {len(features)} images but {len(samples)} samples were given")
    stage_dir.mkdir(parents=True, exist_ok=True)
    subsets = subset_positions(len(paths), llb.k, llb.seed)
    rank, world = rank_and_world()
    if rank == 0:  # every rank builds the same subsets from llb.seed; one writer avoids a torn file
        record_subsets(stage_dir / SUBSETS, subsets, paths, resume)
    ctx = Stage1Context(cfg, encoder, features, scorer.to(features.device))
    seeds = [submodel_seed(llb.seed, j) for j in range(llb.k)]

    def build(j: int) -> SubModel:
        return create_submodel(ctx, j, seeds[j], submodel_dir(stage_dir, j))

    # Stage 1 reseeds per sub-model; fork_rng keeps those draws from leaking into what the caller
    # does next (the stage-2 model's init then does not depend on whether stage 1 ran or resumed).
    cuda = [features.device] if features.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        mine = [j for j in range(llb.k) if j % world == rank]
        pending = [j for j in mine if not resume or read_finished(stage_dir, j, paths, llb.submodel) is None]
        if mine != pending:
            log.info("stage 1: reusing finished sub-models %s", [j for j in mine if j not in pending])
        workers = concurrent_workers(ctx, len(pending))
        if workers > 1:
            # Seeded init uses the global RNG, so every sub-model is built here, before any thread.
            built = {j: build(j) for j in pending}
            jobs = [partial(fit_and_score, built[j], subsets[j], paths, resume) for j in pending]
            run_on_streams(jobs, workers, features.device)
        else:
            for j in pending:
                fit_and_score(build(j), subsets[j], paths, resume)

        def own_scores(j: int) -> dict[str, float]:
            scores = read_finished(stage_dir, j, paths, llb.submodel)
            assert scores is not None, f"sub-model {j} was reused or fitted above"
            return scores

        per_model = [
            own_scores(j) if j in mine else wait_for_scores(stage_dir, j, paths, llb.submodel)
            for j in range(llb.k)
        ]
        table = ScreeningTable(
            paths=paths,
            subset={paths[p]: j for j, part in enumerate(subsets) for p in part},
            scores={path: [scores[path] for scores in per_model] for path in paths},
        )
        consensus = table.consensus()
        kept, cut = cut_ranking(consensus, llb.keep_fraction, llb.outlier_z)
        kept_set = set(kept)
        below = np.asarray([i for i, path in enumerate(paths) if path in kept_set], dtype=np.int64)
        suspects = np.asarray([i for i, path in enumerate(paths) if path not in kept_set], dtype=np.int64)
        loss_weights = None
        if llb.above_cut == "mask" and len(suspects):
            keep_mask = suspect_patch_mask(mean_over_submodels(ctx, stage_dir, seeds, suspects, "patch_scores"), cut)
            loss_weights = torch.ones((len(paths), *keep_mask.shape[1:]), dtype=torch.float32)
            loss_weights[torch.from_numpy(suspects)] = torch.from_numpy(keep_mask).float()
            trained = np.arange(len(paths), dtype=np.int64)
        else:
            trained = below
        summary = summarise(cfg, samples, table, consensus, kept, cut, loss_weights, stage_dir)
        result = Stage1Result(table, consensus, kept, trained, summary, loss_weights)
        if rank == 0:
            write_table(stage_dir / TABLE, samples, table, consensus, kept)
            save_sample_list([samples[i] for i in trained], stage_dir / PURIFIED)
            if loss_weights is not None:
                save_file({"positions": torch.from_numpy(suspects),
                           "keep": loss_weights[torch.from_numpy(suspects)].to(torch.uint8).contiguous()},
                          str(stage_dir / PATCH_MASKS))
            write_report(stage_dir, ctx, samples, result,
                         lambda positions: mean_over_submodels(ctx, stage_dir, seeds, positions, "anomaly_maps"))
        summary["seconds"] = time.perf_counter() - t0
        if rank == 0:
            write_json(stage_dir / SUMMARY, summary)
    log.info("stage 1: %d of %d images above the cut %.5f (estimated contamination %.1f%%): %s",
             summary["removed"], len(paths), cut, 100 * summary["estimated_contamination"],
             "suspect patches masked" if loss_weights is not None else "dropped")
    if summary["labels_known"]:
        log.info("stage 1: anomaly fraction %.1f%% before screening, %.1f%% in the kept set",
                 100 * summary["anomaly_fraction_before"], 100 * summary["anomaly_fraction_after"])
    return result


def run_stage1(
    cfg: RunConfig,
    encoder: DinoEncoder,
    features: EncodedImages,
    samples: list[Sample],
    run_dir: Path,
    resume: bool,
    scorer: AnomalyScorer,
) -> Stage1Result:
    """The pipeline's entry point: stage 1 on ``samples`` into ``run_dir/stage1``."""
    return screen(cfg, encoder, features, samples, Path(run_dir) / STAGE1, resume, scorer)


def discard_submodel_weights(run_dir: Path, cfg: RunConfig) -> None:
    """Delete the sub-models' weights of a completed run. Only stage 1 reads them (patch masks and
    report), and a resumed run enters stage 1 again, so they stay until the whole run is complete."""
    stage_dir = Path(run_dir) / STAGE1
    for j in range(cfg.llb.k):
        (submodel_dir(stage_dir, j) / SUBMODELS[cfg.llb.submodel].WEIGHTS).unlink(missing_ok=True)


def mean_over_submodels(
    ctx: Stage1Context, stage_dir: Path, seeds: list[int], positions: np.ndarray, what: str
) -> np.ndarray:
    """The mean over the fitted sub-models of their ``anomaly_maps`` or ``patch_scores`` at ``positions``:
    the consensus at pixel or patch level, as the consensus score is the mean of theirs."""
    total: np.ndarray | None = None
    for j, seed in enumerate(seeds):
        sub = create_submodel(ctx, j, seed, submodel_dir(stage_dir, j))
        sub.load()
        one = getattr(sub, what)(positions)
        total = one if total is None else total + one
        del sub
    assert total is not None, "no sub-models to average"
    return total / len(seeds)


# ------------------------------------------------------------------------------------- artifacts


def labels_known(samples: list[Sample]) -> bool:
    return bool(samples) and all(s.label != UNKNOWN for s in samples)


def summarise(
    cfg: RunConfig, samples: list[Sample], table: ScreeningTable, consensus: dict[str, float], kept: list[str],
    cut: float, loss_weights: torch.Tensor | None, stage_dir: Path,
) -> dict[str, Any]:
    llb = cfg.llb
    kept_set = set(kept)
    per_model = [read_json(submodel_dir(stage_dir, j) / SCORES) for j in range(llb.k)]
    robust = RobustScale.of(consensus.values())
    suspects = sorted((p for p in consensus if p not in kept_set), key=lambda p: -consensus[p])
    summary: dict[str, Any] = {
        "submodel": llb.submodel,
        "k": llb.k,
        "keep": llb.keep,
        "outlier_z": llb.outlier_z,
        "above_cut": llb.above_cut,
        "seed": llb.seed,
        "submodel_iterations": llb.submodel_iterations if llb.submodel == "dinomaly" else 0,
        "images": len(table.paths),
        "kept": len(kept),
        "removed": len(table.paths) - len(kept),
        # Every image whose consensus score is at or below the cut (ties aside) is below it.
        "threshold": cut,
        "consensus_median": robust.median,
        "consensus_scale": robust.scale,
        "estimated_contamination": len(suspects) / len(table.paths),
        "suspects": [{"path": p, "score": consensus[p], "z": robust.z(consensus[p])} for p in suspects],
        "masked_patch_fraction": 0.0 if loss_weights is None else float(1.0 - loss_weights.mean()),
        "subset_sizes": [int(sum(1 for s in table.subset.values() if s == j)) for j in range(llb.k)],
        "submodel_fit_seconds": [float(r["fit"].get("seconds", 0.0)) for r in per_model],
        "submodel_score_seconds": [float(r["score_seconds"]) for r in per_model],
        "labels_known": labels_known(samples),
        "table": f"{STAGE1}/{TABLE}",
        "purified_list": f"{STAGE1}/{PURIFIED}",
        "report": f"{STAGE1}/{REPORT}",
    }
    if summary["labels_known"]:
        anomalous = {s.path for s in samples if s.label == ANOMALOUS}
        after = len(anomalous & kept_set)
        summary.update({
            "anomalies_before": len(anomalous),
            "anomaly_fraction_before": len(anomalous) / len(samples),
            "anomalies_after": after,
            "anomaly_fraction_after": after / len(kept),
            # How well the consensus ranks the known anomalies (1.0: all above every normal image).
            "screening_auroc": screening_auroc(consensus, anomalous),
        })
    return summary


def screening_auroc(consensus: dict[str, float], anomalous: set[str]) -> float | None:
    """AUROC of the consensus score against known labels; None with one class only."""
    labels = np.asarray([p in anomalous for p in consensus])
    if labels.all() or not labels.any():
        return None
    return image_metrics(np.fromiter(consensus.values(), float), labels)["i_auroc"]


def write_table(
    path: Path, samples: list[Sample], table: ScreeningTable, consensus: dict[str, float], kept: list[str]
) -> None:
    """The per-image table, lowest consensus first: enough to recompute the selection by hand."""
    k = len(next(iter(table.scores.values())))
    by_path = {s.path: s for s in samples}
    kept_set = set(kept)
    ranked = sorted(consensus, key=lambda p: (consensus[p], p))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "path", "label", "defect_type", "subset",
                         *[f"score_{j}" for j in range(k)], "mean", "status"])
        for rank, p in enumerate(ranked):
            sample = by_path[p]
            writer.writerow([rank, p, "" if sample.label == UNKNOWN else sample.label, sample.defect_type,
                             table.subset[p], *[repr(v) for v in table.scores[p]], repr(consensus[p]),
                             "kept" if p in kept_set else "suspect"])
