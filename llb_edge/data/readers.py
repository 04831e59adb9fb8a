"""Dataset readers: a ``DataConfig`` in, a :class:`DatasetSplit` of sorted absolute paths out.

Readers only list files (no decoding: :func:`images.validate_samples` does that, once, before a
run). Every reader is deterministic (sorted listings, seeded numpy generators) and fails with a
``FileNotFoundError`` that names the folder or file the layout expects, because a wrong root is the
most common first-run mistake. The layouts and the choices made for each are in docs/data.md.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from llb_edge.config import DataConfig
from llb_edge.data.samples import ANOMALOUS, NORMAL, DatasetSplit, Sample, contaminate

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MTD_DEFECTS = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
# Real-IAD image folders, in order of preference when several exist: 1024 is what the reference
# recipe resized to 448, so scores stay comparable with the paper; the others are accepted.
REALIAD_IMAGE_DIRS = ("realiad_1024", "realiad_512", "realiad_raw", "realiad_256")
# ELPV defect probabilities: 0 normal, >= 2/3 anomalous, 1/3 ambiguous (left out by default).
ELPV_ANOMALOUS_MIN = 0.5


# --------------------------------------------------------------------------------------- helpers


def _abs(path: Path) -> str:
    """Absolute, normalised, symlinks kept: the stable key a Sample is known by."""
    return os.path.abspath(path)


def _require_dir(path: Path, layout: str, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{layout} layout expects {what}; not found: {path}")
    return path


def _list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (by extension, case-insensitive; hidden files skipped), sorted."""
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    found = [
        p for p in pattern
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(found)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_normals(paths: Iterable[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded train/test split of normal images for layouts that ship none (mtd, folder, elpv).

    Paths are sorted first so the split depends only on the set of files and the seed, not on
    directory listing order. ``round(test_fraction * n)`` go to test, at least one on each side
    when there are two or more images. Returns (train, test), each sorted.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ordered = sorted(paths)
    n = len(ordered)
    n_test = int(round(test_fraction * n))
    if n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    test_idx = set(order[:n_test].tolist())
    train = [p for i, p in enumerate(ordered) if i not in test_idx]
    test = [p for i, p in enumerate(ordered) if i in test_idx]
    return train, test


def cap_samples(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    """Seeded subsample to at most ``limit`` samples, stratified by label (0 = no cap).

    Each label present keeps at least one sample (so a capped test set still has both classes)
    and otherwise gets its proportional share (largest remainder). The result is sorted by path.
    """
    if limit <= 0 or len(samples) <= limit:
        return list(samples)
    groups: dict[int, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.path):
        groups.setdefault(s.label, []).append(s)
    labels = sorted(groups)
    total = len(samples)
    quotas = {lab: limit * len(groups[lab]) / total for lab in labels}
    take = {lab: int(quotas[lab]) for lab in labels}
    if limit >= len(labels):
        for lab in labels:
            take[lab] = max(take[lab], 1)
    by_remainder = sorted(labels, key=lambda lab: (-(quotas[lab] - int(quotas[lab])), lab))
    while sum(take.values()) < limit:
        for lab in by_remainder:
            if sum(take.values()) < limit and take[lab] < len(groups[lab]):
                take[lab] += 1
    while sum(take.values()) > limit:
        biggest = max(labels, key=lambda lab: (take[lab], -lab))
        take[biggest] -= 1
    rng = np.random.default_rng(seed)
    kept: list[Sample] = []
    for lab in labels:
        group = groups[lab]
        idx = rng.choice(len(group), size=take[lab], replace=False)
        kept.extend(group[i] for i in sorted(idx.tolist()))
    return sorted(kept, key=lambda s: s.path)


def _category(cfg: DataConfig, root: Path, layout: str, available: list[str]) -> str:
    if not cfg.category:
        shown = ", ".join(available[:40]) or "none found"
        raise ValueError(f"{layout} needs data.category (one per run); available under {root}: {shown}")
    return cfg.category


# --------------------------------------------------------------------------------------- readers


def load_mtd(cfg: DataConfig) -> DatasetSplit:
    """Magnetic Tile Defects: MT_Free normal, MT_<defect> defective with same-name .png masks.

    No split ships, so normals are split with ``test_fraction``/``split_seed``; every defective
    image goes to test. Normal images get no mask (their shipped masks are empty).
    """
    root = Path(cfg.root)
    free = _require_dir(root / "MT_Free" / "Imgs", "MTD", "<root>/MT_Free/Imgs")
    normals = [_abs(p) for p in sorted(free.glob("*.jpg"))]
    if not normals:
        raise FileNotFoundError(f"MTD layout expects .jpg images in {free}; none found")
    defect_dirs = [d for d in _subdirs(root) if d.name.startswith("MT_") and d.name != "MT_Free"]
    if not defect_dirs:
        expected = ", ".join(f"MT_{name}" for name in MTD_DEFECTS)
        raise FileNotFoundError(f"MTD layout expects defect folders ({expected}) under {root}; none found")
    defects = []
    for folder in defect_dirs:
        imgs = _require_dir(folder / "Imgs", "MTD", f"<root>/{folder.name}/Imgs")
        for p in sorted(imgs.glob("*.jpg")):
            # The expected mask path is recorded even if missing: validate_samples reports it.
            defects.append(Sample(_abs(p), ANOMALOUS, _abs(p.with_suffix(".png")), folder.name[3:]))
    train, test = split_normals(normals, cfg.test_fraction, cfg.split_seed)
    test_samples = [Sample(p, NORMAL) for p in test] + defects
    return DatasetSplit(
        name="mtd",
        train=[Sample(p, NORMAL) for p in train],
        test=sorted(test_samples, key=lambda s: s.path),
    )


def _mvtec_like(cfg: DataConfig, layout: str, mask_name: Callable[[Path], str]) -> DatasetSplit:
    """Shared MVTec / VisA reader: <cat>/train/good, <cat>/test/<type>, <cat>/ground_truth/<type>."""
    root = Path(cfg.root)
    _require_dir(root, layout, "the dataset root (data.root)")
    category = _category(cfg, root, layout, [d.name for d in _subdirs(root)])
    base = root / category
    train_dir = _require_dir(base / "train" / "good", layout, f"<root>/{category}/train/good")
    test_dir = _require_dir(base / "test", layout, f"<root>/{category}/test")
    train = [Sample(_abs(p), NORMAL) for p in _list_images(train_dir)]
    if not train:
        raise FileNotFoundError(f"{layout} layout expects images in {train_dir}; none found")
    test: list[Sample] = []
    for type_dir in _subdirs(test_dir):
        if type_dir.name == "good":
            test.extend(Sample(_abs(p), NORMAL) for p in _list_images(type_dir))
            continue
        gt_dir = _require_dir(base / "ground_truth" / type_dir.name, layout,
                              f"<root>/{category}/ground_truth/{type_dir.name} (masks of test/{type_dir.name})")
        for p in _list_images(type_dir):
            test.append(Sample(_abs(p), ANOMALOUS, _abs(gt_dir / mask_name(p)), type_dir.name))
    if not test:
        raise FileNotFoundError(f"{layout} layout expects images under {test_dir}/<type>; none found")
    return DatasetSplit(name=f"{cfg.dataset}/{category}", train=train,
                        test=sorted(test, key=lambda s: s.path))


def load_mvtec(cfg: DataConfig) -> DatasetSplit:
    """MVTec AD: masks are ``ground_truth/<defect>/<stem>_mask.png``."""
    return _mvtec_like(cfg, "MVTec", lambda p: f"{p.stem}_mask.png")


def load_visa(cfg: DataConfig) -> DatasetSplit:
    """VisA in the 1-class layout (test/good, test/bad): masks are ``ground_truth/bad/<stem>.png``."""
    return _mvtec_like(cfg, "VisA", lambda p: f"{p.stem}.png")


def _realiad_json_dirs(root: Path, cfg: DataConfig) -> list[Path]:
    """Where split JSONs may live: ``<root>/<split_dir>``, or nested under ``realiad_jsons/``.

    The distribution unpacks to ``realiad_jsons/{realiad_jsons, realiad_jsons_sv, ...}``, so both
    ``<root>/realiad_jsons_fuiad_0.1`` and ``<root>/realiad_jsons/realiad_jsons_fuiad_0.1`` work.
    """
    split_dir = cfg.split_dir or "realiad_jsons"
    return [root / split_dir, root / "realiad_jsons" / split_dir]


def _realiad_json(root: Path, cfg: DataConfig) -> Path:
    candidates = [d / f"{cfg.category}.json" for d in _realiad_json_dirs(root, cfg)]
    for path in candidates:
        if path.is_file():
            return path
    tried = " or ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"Real-IAD layout expects the split file {tried}; not found")


def _realiad_image_root(root: Path, prefix: str) -> Path:
    for name in REALIAD_IMAGE_DIRS:
        if (root / name / prefix).is_dir():
            return root / name / prefix
    tried = ", ".join(f"<root>/{name}/{prefix}" for name in REALIAD_IMAGE_DIRS)
    raise FileNotFoundError(f"Real-IAD layout expects one of {tried} under {root}; none found")


def load_realiad(cfg: DataConfig) -> DatasetSplit:
    """Real-IAD from a per-category split JSON (plain or FUIAD: anomalies in train keep label 1).

    ``data.root`` is the folder holding both the JSON folder(s) and the image folder
    ``realiad_{1024,512,raw,256}`` (the first that exists is used). Paths in the JSON are relative
    to ``<image folder>/<meta.prefix or category>/``.
    """
    root = Path(cfg.root)
    _require_dir(root, "Real-IAD", "the folder holding realiad_jsons*/ and realiad_<res>/ (data.root)")
    if not cfg.category:
        dirs = _realiad_json_dirs(root, cfg)
        available = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.json")})
        _category(cfg, dirs[0], "Real-IAD", available)
    json_path = _realiad_json(root, cfg)
    try:
        spec = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"Real-IAD split file {json_path} is not valid JSON: {err}") from err
    meta = spec.get("meta") or {}
    normal_class = meta.get("normal_class", "OK")
    image_root = _realiad_image_root(root, meta.get("prefix") or cfg.category)

    def convert(entries: list[dict], side: str) -> list[Sample]:
        samples = []
        for i, entry in enumerate(entries):
            try:
                image_path, anomaly_class = entry["image_path"], entry["anomaly_class"]
            except (KeyError, TypeError) as err:
                raise ValueError(f"{json_path}: {side}[{i}] lacks image_path/anomaly_class") from err
            label = NORMAL if anomaly_class == normal_class else ANOMALOUS
            mask = entry.get("mask_path")
            samples.append(Sample(
                path=_abs(image_root / image_path),
                label=label,
                mask_path=_abs(image_root / mask) if mask and label == ANOMALOUS else None,
                defect_type="good" if label == NORMAL else str(anomaly_class),
            ))
        return sorted(samples, key=lambda s: s.path)

    for side in ("train", "test"):
        if not isinstance(spec.get(side), list):
            raise ValueError(f"Real-IAD split file {json_path} has no '{side}' list")
    split_name = cfg.split_dir or "realiad_jsons"
    return DatasetSplit(name=f"realiad/{cfg.category}@{split_name}",
                        train=convert(spec["train"], "train"), test=convert(spec["test"], "test"))


def _folder_mask_index(mask_root: Path) -> dict[tuple[str, str], Path]:
    """(relative parent folder, stem) -> mask path; ``<stem>_mask`` also registers as ``<stem>``."""
    index: dict[tuple[str, str], Path] = {}
    for p in _list_images(mask_root, recursive=True):
        parent = p.parent.relative_to(mask_root).as_posix()
        stems = [p.stem] + ([p.stem[: -len("_mask")]] if p.stem.endswith("_mask") else [])
        for stem in stems:
            index.setdefault((parent, stem), p)
    return index


def load_folder(cfg: DataConfig) -> DatasetSplit:
    """A generic folder: ``normal_dir`` normal images, optional ``defect_dir`` (test only) and masks.

    Folders are searched recursively. A defect image in a subfolder gets the subfolder name as
    defect type ("defect" otherwise). Its mask is the image of the same stem (any extension, or
    ``<stem>_mask``) in ``mask_dir``, looked up first at the same relative subfolder, then at the
    top of ``mask_dir``. Defects without a mask keep ``mask_path=None`` (image-level only).
    """
    root = Path(cfg.root)
    normal_dir = _require_dir(root / cfg.normal_dir, "folder", f"<root>/{cfg.normal_dir} (data.normal_dir)")
    mask_root = None
    if cfg.mask_dir:
        mask_root = _require_dir(root / cfg.mask_dir, "folder", f"<root>/{cfg.mask_dir} (data.mask_dir)")

    def outside_masks(paths: list[Path]) -> list[Path]:
        if mask_root is None:
            return paths
        return [p for p in paths if not p.resolve().is_relative_to(mask_root.resolve())]

    normals = [_abs(p) for p in outside_masks(_list_images(normal_dir, recursive=True))]
    if not normals:
        raise FileNotFoundError(f"folder layout expects normal images in {normal_dir}; none found")
    defects: list[Sample] = []
    if cfg.defect_dir:
        defect_dir = _require_dir(root / cfg.defect_dir, "folder", f"<root>/{cfg.defect_dir} (data.defect_dir)")
        index = _folder_mask_index(mask_root) if mask_root is not None else {}
        unmasked = 0
        for p in outside_masks(_list_images(defect_dir, recursive=True)):
            parent = p.parent.relative_to(defect_dir).as_posix()
            mask = index.get((parent, p.stem)) or index.get((".", p.stem))
            unmasked += mask is None
            defect_type = parent.split("/")[0] if parent != "." else "defect"
            defects.append(Sample(_abs(p), ANOMALOUS, _abs(mask) if mask else None, defect_type))
        if mask_root is not None and unmasked:
            warnings.warn(f"{unmasked} of {len(defects)} defect images in {defect_dir} have no mask in "
                          f"{mask_root}; they count for image-level metrics only", stacklevel=3)
    train, test = split_normals(normals, cfg.test_fraction, cfg.split_seed)
    name = f"folder/{Path(os.path.abspath(root)).name}"
    return DatasetSplit(name=name, train=[Sample(p, NORMAL) for p in train],
                        test=sorted([Sample(p, NORMAL) for p in test] + defects, key=lambda s: s.path))


def elpv_labels_file(cfg: DataConfig | None = None) -> Path:
    """labels.csv of ELPV: ``<data.root>/labels.csv`` if present, else the installed package's."""
    if cfg is not None and cfg.root and (Path(cfg.root) / "labels.csv").is_file():
        return Path(cfg.root) / "labels.csv"
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "ELPV needs the elpv-dataset package (pip install 'llb-edge[demo]') or a data.root "
            "folder holding labels.csv and images/; neither found"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "labels.csv"
    if not path.is_file():
        raise FileNotFoundError(f"ELPV layout expects {path} inside the elpv-dataset package; not found")
    return path


def load_elpv(cfg: DataConfig, include_ambiguous: bool = False) -> DatasetSplit:
    """ELPV solar cells: probability 0 normal, >= 2/3 anomalous, 1/3 ambiguous; no masks.

    The images are the PNG files shipped in the package (paths point there, nothing is copied).
    Ambiguous (1/3) cells are left out of train and test; ``include_ambiguous`` puts them in test
    as anomalous, for a sensitivity check. ``data.category`` may be ``mono`` or ``poly`` to keep
    one cell type (empty: both). Normals are split like MTD; every anomalous cell is in test.
    """
    labels_file = elpv_labels_file(cfg)
    if cfg.category not in ("", "mono", "poly"):
        raise ValueError(f"ELPV data.category must be '', 'mono' or 'poly', got {cfg.category!r}")
    normals, anomalies = [], []
    with open(labels_file, encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle, delimiter=" ", skipinitialspace=True), 1):
            if not row:
                continue
            try:
                rel, prob, cell_type = row[0], float(row[1]), row[2]
            except (IndexError, ValueError) as err:
                raise ValueError(f"{labels_file}:{number}: expected 'path probability type'") from err
            if cfg.category and cell_type != cfg.category:
                continue
            path = _abs(labels_file.parent / rel)
            if prob == 0.0:
                normals.append(path)
            elif prob >= ELPV_ANOMALOUS_MIN or include_ambiguous:
                anomalies.append(Sample(path, ANOMALOUS, None, f"p{prob:.2f}"))
    if not normals:
        raise FileNotFoundError(f"ELPV: no normal cells listed in {labels_file}")
    train, test = split_normals(normals, cfg.test_fraction, cfg.split_seed)
    name = "elpv" + (f"/{cfg.category}" if cfg.category else "")
    return DatasetSplit(name=name, train=[Sample(p, NORMAL) for p in train],
                        test=sorted([Sample(p, NORMAL) for p in test] + anomalies, key=lambda s: s.path))


READERS: dict[str, Callable[[DataConfig], DatasetSplit]] = {
    "mtd": load_mtd,
    "mvtec": load_mvtec,
    "visa": load_visa,
    "realiad": load_realiad,
    "folder": load_folder,
    "elpv": load_elpv,
}


def load_dataset(cfg: DataConfig) -> DatasetSplit:
    """Read the dataset ``cfg.dataset`` names, then apply the ``max_train``/``max_test`` caps."""
    reader = READERS.get(cfg.dataset)
    if reader is None:
        raise ValueError(f"unknown data.dataset {cfg.dataset!r}; known: {', '.join(sorted(READERS))}")
    split = reader(cfg)
    if cfg.max_train or cfg.max_test:
        split = DatasetSplit(
            name=split.name,
            train=cap_samples(split.train, cfg.max_train, cfg.split_seed),
            test=cap_samples(split.test, cfg.max_test, cfg.split_seed + 1),
        )
    return split


def realiad_split_dir(alpha: float) -> str:
    """The official FUIAD split folder for one contamination level, e.g. realiad_jsons_fuiad_0.1."""
    return f"realiad_jsons_fuiad_{alpha:.1f}"


def load_contaminated(data: DataConfig, alpha: float, seed: int) -> DatasetSplit:
    """The contaminated train/test split for ``alpha`` (no decoding: paths and labels only).

    The test cap (``data.max_test``) is applied after contaminating, so that the defective images
    moved into train are drawn from the whole test set, as the protocol defines them.
    ``data.contamination`` is ignored: ``alpha`` is given. Real-IAD uses its official FUIAD split
    for ``alpha`` instead of moving images.
    """
    if data.dataset == "realiad":
        return load_dataset(replace(data, split_dir=realiad_split_dir(alpha)))
    split = contaminate(load_dataset(replace(data, max_test=0)), alpha, seed)
    if data.max_test:
        split = DatasetSplit(split.name, split.train, cap_samples(split.test, data.max_test, data.split_seed + 1))
    return split


def load_configured_split(data: DataConfig) -> DatasetSplit:
    """The split ``data`` describes, with ``data.contamination`` applied (no decoding).

    The trainer's recipe: it reads this once and records the result in the run directory
    (llb_edge.runs.RunSplit); everything downstream reads that record, not this.
    """
    if data.contamination:
        return load_contaminated(data, data.contamination, data.split_seed)
    return load_dataset(data)
