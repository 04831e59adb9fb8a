"""What a dataset is to the rest of llb-edge: lists of image paths with labels, nothing decoded.

A :class:`Sample` is keyed by its image path everywhere (scores, purified-train lists, reports), so
readers give absolute, normalised paths and keep every list sorted: two runs over the same tree
then produce byte-identical sample lists and comparable run directories.

Labels on *train* samples are kept even when they are anomalous (the FUIAD splits and
:func:`contaminate` put anomalies into train on purpose). Training never reads them; they exist
so that the purification stage can be scored afterwards (how many anomalies did stage 1 drop?).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

NORMAL, ANOMALOUS, UNKNOWN = 0, 1, -1


@dataclass(frozen=True)
class Sample:
    """One image: its path (the key), label (0 normal, 1 anomalous, -1 unknown) and optional mask."""

    path: str
    label: int
    mask_path: str | None = None
    defect_type: str = "good"

    def __post_init__(self) -> None:
        if self.label not in (NORMAL, ANOMALOUS, UNKNOWN):
            raise ValueError(f"label must be 0, 1 or -1, got {self.label!r} for {self.path}")


@dataclass
class DatasetSplit:
    """A named train/test pair of sample lists (train may hold anomalies: the FUIAD setting)."""

    name: str
    train: list[Sample]
    test: list[Sample]

    def summary(self) -> str:
        """One line for logs and reports: how many images of each kind each side holds."""

        def count(samples: list[Sample]) -> str:
            n_anom = sum(s.label == ANOMALOUS for s in samples)
            n_unk = sum(s.label == UNKNOWN for s in samples)
            text = f"{len(samples)} ({len(samples) - n_anom - n_unk} normal, {n_anom} anomalous"
            return text + (f", {n_unk} unknown)" if n_unk else ")")

        return f"{self.name}: train {count(self.train)}, test {count(self.test)}"


def contaminate(split: DatasetSplit, alpha: float, seed: int) -> DatasetSplit:
    """Synthetic FUIAD contamination, the MVTec-style protocol of method.md section 7.

    Moves ``int(alpha * len(split.train))`` defective test images, chosen with ``seed``, into
    train and removes them from test ("no overlap"), so the test score is never measured on an
    image the model trained on. The moved samples keep label 1 (for analysis only). ``alpha`` is
    relative to the *clean* train size, as in the protocol; the resulting anomaly fraction of
    train is therefore ``n / (len(train) + n)``, slightly below ``alpha``.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    n_move = int(alpha * len(split.train))
    defective = sorted((s for s in split.test if s.label == ANOMALOUS), key=lambda s: s.path)
    if n_move > len(defective):
        raise ValueError(
            f"contaminate({split.name}, alpha={alpha}): needs {n_move} defective test images "
            f"(int({alpha} * {len(split.train)} train images)) but test holds only {len(defective)}; "
            f"lower alpha, or do not cap the test set (data.max_test) before contaminating"
        )
    rng = np.random.default_rng(seed)
    chosen = [defective[i] for i in sorted(rng.choice(len(defective), size=n_move, replace=False))]
    moved = {s.path for s in chosen}
    train = sorted([*split.train, *chosen], key=lambda s: s.path)
    test = [s for s in split.test if s.path not in moved]
    name = f"{split.name}+alpha{alpha:g}" if n_move else split.name
    return DatasetSplit(name=name, train=train, test=test)


def sample_to_dict(sample: Sample) -> dict[str, Any]:
    """The JSON form of a sample, as every run record stores it."""
    return asdict(sample)


def sample_from_dict(record: Any) -> Sample:
    """A sample from :func:`sample_to_dict`'s form; KeyError, TypeError or ValueError when it is not one."""
    return Sample(
        path=str(record["path"]),
        label=int(record["label"]),
        mask_path=record.get("mask_path"),
        defect_type=str(record.get("defect_type", "good")),
    )


def save_sample_list(samples: list[Sample], path: str | Path) -> None:
    """Write samples as JSON lines, so a run directory records exactly which images it used."""
    lines = [json.dumps(sample_to_dict(s), ensure_ascii=False) for s in samples]
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def load_sample_list(path: str | Path) -> list[Sample]:
    """Read a list written by :func:`save_sample_list`; a malformed line names file and line number."""
    samples = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            samples.append(sample_from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{number}: not a sample record ({err})") from err
    return samples
