"""Data layer: readers on tiny trees built from real MTD images, MTD/ELPV on the real data, decoding.

The MVTec / VisA / Real-IAD / folder trees are anomalib-style dummies: a handful of real MTD tiles
and their real masks, shrunk to 64 px and laid out the way each dataset ships, so the readers are
exercised on real JPEG/PNG files without the (unavailable) datasets themselves.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from llb_edge.config import DataConfig
from llb_edge.data.images import (
    ImageReadError,
    decode_image_bytes,
    read_image_rgb,
    read_mask,
    validate_samples,
    validate_split,
)
from llb_edge.data.readers import READERS, cap_samples, load_dataset, load_elpv, split_normals
from llb_edge.data.samples import DatasetSplit, Sample, contaminate, load_sample_list, save_sample_list
from llb_edge.data.transforms import Geometry

MTD = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd"
if not MTD.is_dir():
    MTD = Path("/work/shared/data/mtd")
needs_mtd = pytest.mark.skipif(not (MTD / "MT_Free" / "Imgs").is_dir(), reason="shared MTD data not present")
SIZE = 64


def _imwrite(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix.lower(), image)
    assert ok, path
    buf.tofile(str(path))
    return path


def _small(path: Path, mask: bool = False) -> np.ndarray:
    image = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
    interp = cv2.INTER_NEAREST if mask else cv2.INTER_AREA
    return cv2.resize(image, (SIZE, SIZE), interpolation=interp)


@pytest.fixture(scope="module")
def mtd_pool():
    """A few real MTD tiles: (normal images, [(defect image, its mask, defect type)]), 64x64 arrays."""
    if not (MTD / "MT_Free" / "Imgs").is_dir():
        pytest.skip("shared MTD data not present")
    normals = [_small(p) for p in sorted((MTD / "MT_Free" / "Imgs").glob("*.jpg"))[:6]]
    defects = []
    for kind in ("Crack", "Blowhole"):
        for p in sorted((MTD / f"MT_{kind}" / "Imgs").glob("*.jpg"))[:2]:
            mask = _small(p.with_suffix(".png"), mask=True)
            # Keep the masks non-empty after shrinking, whatever the tile.
            if not mask.any():
                mask[SIZE // 2, SIZE // 2] = 255
            defects.append((_small(p), mask, kind.lower()))
    return normals, defects


def _mvtec_like_tree(base: Path, mtd_pool, image_name, mask_name, defect_dir=None) -> None:
    """MVTec-shaped category folder (VisA's per-category layout is the same): train/good, test/good,
    test/<defect>, ground_truth/<defect>. ``image_name(split, i)`` and ``mask_name(i)`` name the files;
    ``defect_dir`` is the defect folder (None: the defect's kind)."""
    normals, defects = mtd_pool
    for i, img in enumerate(normals[:4]):
        _imwrite(base / "train" / "good" / image_name("train", i), img)
    for i, img in enumerate(normals[4:6]):
        _imwrite(base / "test" / "good" / image_name("good", i), img)
    for i, (img, mask, kind) in enumerate(defects):
        _imwrite(base / "test" / (defect_dir or kind) / image_name("defect", i), img)
        _imwrite(base / "ground_truth" / (defect_dir or kind) / mask_name(i), mask)


@pytest.fixture()
def mvtec_root(tmp_path, mtd_pool):
    base = tmp_path / "mvtec" / "tile"
    _mvtec_like_tree(base, mtd_pool, lambda split, i: f"{i:03d}.png", lambda i: f"{i:03d}_mask.png")
    (base / "license.txt").write_text("not an image folder\n")
    return tmp_path / "mvtec"


@pytest.fixture()
def visa_root(tmp_path, mtd_pool):
    # VisA numbers its files across the category: train 0.., test good 100.., test bad 200..
    first = {"train": 0, "good": 100, "defect": 200}
    _mvtec_like_tree(tmp_path / "visa" / "tile", mtd_pool, lambda split, i: f"{first[split] + i:04d}.JPG",
                     lambda i: f"{200 + i:04d}.png", defect_dir="bad")
    return tmp_path / "visa"


def _realiad_tree(root: Path, mtd_pool, json_dir: Path, res: str = "realiad_512") -> None:
    """Real-IAD-shaped tree: images under <res>/tile/{OK,NG/<cls>}/S..., a FUIAD split JSON."""
    normals, defects = mtd_pool
    images = root / res / "tile"
    train, test = [], []
    for i, img in enumerate(normals):
        rel = f"OK/S{i:04d}/tile_{i:04d}_OK_C1_2023.jpg"
        _imwrite(images / rel, img)
        entry = {"category": "tile", "anomaly_class": "OK", "image_path": rel, "mask_path": None}
        (train if i < 4 else test).append(entry)
    for i, (img, mask, _) in enumerate(defects):
        cls = "AK" if i % 2 == 0 else "QS"
        rel = f"NG/{cls}/S{10 + i:04d}/tile_{10 + i:04d}_NG_{cls}_C2_2023"
        _imwrite(images / f"{rel}.jpg", img)
        _imwrite(images / f"{rel}.png", mask)
        entry = {"category": "tile", "anomaly_class": cls, "image_path": f"{rel}.jpg", "mask_path": f"{rel}.png"}
        # FUIAD: the first anomaly is (unlabelled) contamination in train.
        (train if i == 0 else test).append(entry)
    json_dir.mkdir(parents=True, exist_ok=True)
    meta = {"prefix": "tile", "normal_class": "OK"}
    (json_dir / "tile.json").write_text(json.dumps({"meta": meta, "train": train, "test": test}))


@pytest.fixture()
def folder_root(tmp_path, mtd_pool):
    normals, defects = mtd_pool
    root = tmp_path / "line7"
    for i, img in enumerate(normals):
        _imwrite(root / "ok" / f"part_{i:02d}.bmp", img)
    for i, (img, mask, kind) in enumerate(defects):
        _imwrite(root / "ng" / kind / f"d{i}.jpg", img)
        if i != 3:  # one defect has no mask
            _imwrite(root / "masks" / f"d{i}.png", mask)
    return root


# --------------------------------------------------------------------------------------- MTD (real)


@needs_mtd
def test_mtd_real_counts_split_and_masks():
    split = load_dataset(DataConfig(dataset="mtd", root=str(MTD)))
    train, test = split.train, split.test
    normal_test = [s for s in test if s.label == 0]
    defective = [s for s in test if s.label == 1]
    assert len(train) + len(normal_test) == 952
    assert len(defective) == 392
    assert len(normal_test) == round(0.2 * 952) and len(train) == 952 - len(normal_test)
    assert all(s.label == 0 and s.mask_path is None for s in train)
    assert {s.defect_type for s in defective} == {"Blowhole", "Break", "Crack", "Fray", "Uneven"}
    assert all(s.mask_path == s.path[:-4] + ".png" and os.path.isfile(s.mask_path) for s in defective)
    assert not {s.path for s in train} & {s.path for s in test}
    assert [s.path for s in train] == sorted(s.path for s in train)
    assert all(os.path.isabs(s.path) for s in train + test)


@needs_mtd
def test_mtd_split_deterministic_and_seeded():
    cfg = DataConfig(dataset="mtd", root=str(MTD))
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.train == b.train and a.test == b.test
    other = load_dataset(DataConfig(dataset="mtd", root=str(MTD), split_seed=1))
    assert {s.path for s in other.test} != {s.path for s in a.test}
    assert len(other.test) == len(a.test)


def test_mtd_wrong_root_names_expected_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MT_Free/Imgs"):
        load_dataset(DataConfig(dataset="mtd", root=str(tmp_path)))


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError) as err:
        load_dataset(DataConfig(dataset="mvtec_loco"))
    for name in READERS:
        assert name in str(err.value)


# --------------------------------------------------------------------------------------- layouts


def test_mvtec_reader(mvtec_root):
    split = load_dataset(DataConfig(dataset="mvtec", root=str(mvtec_root), category="tile"))
    assert split.name == "mvtec/tile"
    assert len(split.train) == 4 and all(s.label == 0 for s in split.train)
    assert sorted(s.defect_type for s in split.test) == ["blowhole", "blowhole", "crack", "crack", "good", "good"]
    for s in split.test:
        if s.label == 0:
            assert s.mask_path is None and s.defect_type == "good"
        else:
            assert Path(s.mask_path).name == Path(s.path).stem + "_mask.png"
            assert Path(s.mask_path).parent.name == s.defect_type
            assert read_mask(s.mask_path, SIZE, SIZE).any()
    assert validate_split(split) is split


def test_mvtec_errors(mvtec_root):
    with pytest.raises(ValueError, match="data.category.*tile"):
        load_dataset(DataConfig(dataset="mvtec", root=str(mvtec_root)))
    with pytest.raises(FileNotFoundError, match=r"MVTec layout expects <root>/nope/train/good; not found"):
        load_dataset(DataConfig(dataset="mvtec", root=str(mvtec_root), category="nope"))


def test_visa_reader(visa_root):
    split = load_dataset(DataConfig(dataset="visa", root=str(visa_root), category="tile"))
    assert (len(split.train), len(split.test)) == (4, 6)
    bad = [s for s in split.test if s.label == 1]
    assert len(bad) == 4 and {s.defect_type for s in bad} == {"bad"}
    assert all(Path(s.mask_path).stem == Path(s.path).stem and os.path.isfile(s.mask_path) for s in bad)
    assert validate_samples(split.test) == split.test


def test_realiad_fuiad_reader(tmp_path, mtd_pool):
    root = tmp_path / "Real-IAD"
    _realiad_tree(root, mtd_pool, root / "realiad_jsons_fuiad_0.1")
    cfg = DataConfig(dataset="realiad", root=str(root), category="tile", split_dir="realiad_jsons_fuiad_0.1")
    split = load_dataset(cfg)
    assert split.name == "realiad/tile@realiad_jsons_fuiad_0.1"
    assert (len(split.train), len(split.test)) == (5, 5)
    contaminated = [s for s in split.train if s.label == 1]
    assert len(contaminated) == 1 and contaminated[0].defect_type == "AK"
    assert contaminated[0].mask_path is not None and os.path.isfile(contaminated[0].mask_path)
    assert all("/realiad_512/tile/" in s.path and os.path.isfile(s.path) for s in split.train + split.test)
    assert {s.defect_type for s in split.test if s.label == 1} == {"AK", "QS"}
    assert all(s.mask_path is None for s in split.train + split.test if s.label == 0)
    assert validate_split(split) is split


def test_realiad_nested_jsons_and_errors(tmp_path, mtd_pool):
    root = tmp_path / "Real-IAD"
    # The distribution unpacks as realiad_jsons/realiad_jsons/<cat>.json; images at 1024.
    _realiad_tree(root, mtd_pool, root / "realiad_jsons" / "realiad_jsons", res="realiad_1024")
    split = load_dataset(DataConfig(dataset="realiad", root=str(root), category="tile", split_dir=""))
    assert len(split.train) + len(split.test) == 10 and "/realiad_1024/" in split.train[0].path
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_dataset(DataConfig(dataset="realiad", root=str(root), category="missing"))
    with pytest.raises(ValueError, match="tile"):
        load_dataset(DataConfig(dataset="realiad", root=str(root), category=""))


def test_folder_reader(folder_root):
    cfg = DataConfig(dataset="folder", root=str(folder_root), normal_dir="ok", defect_dir="ng",
                     mask_dir="masks", test_fraction=0.5, split_seed=3)
    with pytest.warns(UserWarning, match="1 of 4 defect images"):
        split = load_dataset(cfg)
    assert (len(split.train), sum(s.label == 0 for s in split.test)) == (3, 3)
    defects = {Path(s.path).stem: s for s in split.test if s.label == 1}
    assert sorted(defects) == ["d0", "d1", "d2", "d3"]
    assert defects["d0"].defect_type == "crack" and defects["d2"].defect_type == "blowhole"
    assert Path(defects["d1"].mask_path).name == "d1.png" and defects["d3"].mask_path is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_dataset(cfg).test == split.test
    only_normal = load_dataset(DataConfig(dataset="folder", root=str(folder_root), normal_dir="ok"))
    assert all(s.label == 0 for s in only_normal.test) and len(only_normal.test) == 1
    with pytest.raises(FileNotFoundError, match=r"<root>/good \(data.normal_dir\)"):
        load_dataset(DataConfig(dataset="folder", root=str(folder_root)))


def test_elpv_counts_from_package():
    split = load_dataset(DataConfig(dataset="elpv", test_fraction=0.2))
    normal_test = [s for s in split.test if s.label == 0]
    anomalous = [s for s in split.test if s.label == 1]
    assert len(split.train) + len(normal_test) == 1508  # probability 0
    assert len(anomalous) == 821  # probability 2/3 and 1; the 295 at 1/3 are left out
    assert {s.defect_type for s in anomalous} == {"p0.67", "p1.00"}
    assert all(s.mask_path is None for s in split.test)
    assert all(os.path.isfile(s.path) and s.path.endswith(".png") for s in split.train[:5] + anomalous[:5])
    assert len(load_elpv(DataConfig(dataset="elpv"), include_ambiguous=True).test) == len(split.test) + 295
    mono = load_dataset(DataConfig(dataset="elpv", category="mono"))
    assert len(mono.train) + len(mono.test) == 588 + 56 + 313


@needs_mtd
def test_caps_are_stratified_and_seeded():
    cfg = DataConfig(dataset="mtd", root=str(MTD), max_train=20, max_test=10)
    split = load_dataset(cfg)
    assert (len(split.train), len(split.test)) == (20, 10)
    assert {s.label for s in split.test} == {0, 1}
    assert load_dataset(cfg).test == split.test
    rare = [Sample(f"/n{i}", 0) for i in range(99)] + [Sample("/a", 1)]
    assert {s.label for s in cap_samples(rare, 5, seed=0)} == {0, 1}
    assert cap_samples(rare, 0, seed=0) == rare


def test_split_normals_edges():
    train, test = split_normals([f"/x{i}" for i in range(10)][::-1], 0.2, seed=0)
    assert len(test) == 2 and train == sorted(train) and not set(train) & set(test)
    assert split_normals(["/b", "/a"], 0.01, 0)[1] != []
    with pytest.raises(ValueError):
        split_normals(["/a"], 1.0, 0)


# --------------------------------------------------------------------------------------- samples


def _toy_split() -> DatasetSplit:
    train = [Sample(f"/d/train/{i:03d}.png", 0) for i in range(40)]
    test = [Sample(f"/d/test/good_{i:03d}.png", 0) for i in range(10)]
    test += [Sample(f"/d/test/bad_{i:03d}.png", 1, f"/d/gt/bad_{i:03d}.png", "scratch") for i in range(12)]
    return DatasetSplit("toy", train, test)


def test_contaminate_moves_exactly_and_is_seeded():
    split = _toy_split()
    out = contaminate(split, alpha=0.2, seed=7)
    moved = [s for s in out.train if s.label == 1]
    assert len(moved) == int(0.2 * 40) == 8
    assert len(out.train) == 48 and len(out.test) == len(split.test) - 8
    assert not {s.path for s in out.train} & {s.path for s in out.test}
    assert all(s.mask_path and s.defect_type == "scratch" for s in moved)
    assert contaminate(split, 0.2, seed=7).train == out.train
    assert contaminate(split, 0.2, seed=8).train != out.train
    assert split.test == _toy_split().test  # the input is not modified
    assert contaminate(split, 0.0, seed=0).train == split.train
    with pytest.raises(ValueError, match="needs 16 defective test images.*only 12"):
        contaminate(split, alpha=0.4, seed=0)


def test_sample_list_roundtrip(tmp_path):
    samples = _toy_split().test + [Sample("/d/ünïcode name.png", -1)]
    save_sample_list(samples, tmp_path / "test.jsonl")
    assert load_sample_list(tmp_path / "test.jsonl") == samples
    (tmp_path / "bad.jsonl").write_text('{"path": "/a", "label": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_sample_list(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError):
        Sample("/a", 2)


# --------------------------------------------------------------------------------------- decoding


def test_read_image_rgb_formats(tmp_path):
    gray = np.tile(np.arange(32, dtype=np.uint8) * 8, (20, 1))
    rgb = read_image_rgb(_imwrite(tmp_path / "gray.png", gray))
    assert rgb.shape == (20, 32, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == gray).all() and (rgb[..., 2] == gray).all()

    bgra = np.zeros((8, 9, 4), np.uint8)
    bgra[..., 2] = 200  # red in OpenCV's BGR(A) order
    bgra[..., 3] = 17
    rgb = read_image_rgb(_imwrite(tmp_path / "rgba.png", bgra))
    assert rgb.shape == (8, 9, 3) and (rgb[..., 0] == 200).all() and (rgb[..., 1:] == 0).all()

    deep = np.full((5, 6), 65535, np.uint16)
    deep[0, 0], deep[0, 1] = 0, 32896  # 32896 = 128 * 257
    rgb = read_image_rgb(_imwrite(tmp_path / "deep.png", deep))
    assert rgb.dtype == np.uint8 and rgb[1, 1, 0] == 255 and rgb[0, 0, 0] == 0 and rgb[0, 1, 0] == 128

    odd = _imwrite(tmp_path / "dïr with space" / "bild #1 ü.png", bgra)
    assert read_image_rgb(odd).shape == (8, 9, 3)
    assert (decode_image_bytes(odd.read_bytes()) == read_image_rgb(odd)).all()


@needs_mtd
def test_corrupt_files_raise_naming_the_file(tmp_path):
    jpg = sorted((MTD / "MT_Crack" / "Imgs").glob("*.jpg"))[0].read_bytes()
    cases = {
        "truncated.jpg": jpg[: len(jpg) // 2],
        "almost.jpg": jpg[:-2],  # only the end-of-image marker missing
        "noise.png": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty.jpg": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageReadError, match=name.replace(".", r"\.")) as err:
            read_image_rgb(tmp_path / name)
        assert err.value.path == str(tmp_path / name)
    with pytest.raises(ImageReadError, match="file not found"):
        read_image_rgb(tmp_path / "absent.png")
    with pytest.raises(ImageReadError, match="frame 12"):
        decode_image_bytes(jpg[:300], name="frame 12")
    assert decode_image_bytes(jpg).shape[2] == 3
    # Data after the end-of-image marker (camera trailers) is not corruption.
    assert decode_image_bytes(jpg + b"TRAILER\xff\xd8").shape == decode_image_bytes(jpg).shape
    # The error survives a round trip through pickle (worker processes re-raise it).
    again = pickle.loads(pickle.dumps(err.value))
    assert isinstance(again, ImageReadError) and str(again) == str(err.value) and again.path == err.value.path


def test_read_mask(tmp_path):
    assert not read_mask(None, 4, 5).any() and read_mask(None, 4, 5).shape == (4, 5)
    mask = np.zeros((10, 10), np.uint8)
    mask[:5, :5] = 255
    mask[9, 9] = 3  # faint anti-aliased pixel: below half intensity, not defect (method.md: > 0.5)
    mask[9, 0] = 128  # just above half: defect
    path = _imwrite(tmp_path / "m.png", mask)
    same = read_mask(path, 10, 10)
    assert same.dtype == bool and same.sum() == 26 and same[9, 0] and not same[9, 9]
    bigger = read_mask(path, 20, 20)
    assert bigger.shape == (20, 20) and bigger[:10, :10].all() and not bigger[10:18, :].any()


def test_validate_samples_error_vs_skip(tmp_path):
    good = _imwrite(tmp_path / "good.png", np.full((6, 6), 90, np.uint8))
    (tmp_path / "bad1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (tmp_path / "bad2.png").write_bytes(b"junk")
    samples = [
        Sample(str(good), 0),
        Sample(str(tmp_path / "bad1.jpg"), 0),
        Sample(str(good), 1, str(tmp_path / "missing_mask.png"), "x"),
        Sample(str(tmp_path / "bad2.png"), 1),
    ]
    with pytest.raises(ImageReadError) as err:
        validate_samples(samples, "error")
    message = str(err.value)
    for name in ("bad1.jpg", "bad2.png", "missing_mask.png"):
        assert name in message
    assert len(err.value.bad) == 3
    with pytest.warns(UserWarning, match="skipped 3 sample") as record:
        kept = validate_samples(samples, "skip")
    assert kept == samples[:1]
    assert all(n in str(record[0].message) for n in ("bad1.jpg", "bad2.png", "missing_mask.png"))
    with pytest.raises(ValueError, match="on_bad_file"):
        validate_samples(samples, "ignore")
    split = DatasetSplit("s", train=samples[:2], test=samples[2:])
    with pytest.warns(UserWarning):
        clean = validate_split(split, "skip")
    assert (clean.train, clean.test) == (samples[:1], [])


@needs_mtd
def test_geometry_on_real_mtd_image_and_mask():
    path = sorted((MTD / "MT_Blowhole" / "Imgs").glob("*.jpg"))[0]
    image = read_image_rgb(path)
    mask = read_mask(path.with_suffix(".png"), *image.shape[:2])
    assert image.dtype == np.uint8 and image.shape[2] == 3 and mask.any()
    geometry = Geometry(resize=112, crop=98)
    model_in = geometry.to_model_input(image)
    model_mask = geometry.mask_to_model(mask)
    assert model_in.shape == (98, 98, 3) and model_in.dtype == np.uint8
    assert model_mask.shape == (98, 98) and model_mask.dtype == bool
    assert set(np.unique(model_mask).tolist()) <= {False, True}
