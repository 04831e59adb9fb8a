"""The capture pool's format and its reader (no OpenCV, no torch: labelling and retrain read it).

Layout (docs/retrain.md)::

    <pool>/frames/<name>.png   captured frames: lossless PNG, original resolution, 8-bit as inspected
    <pool>/manifest.jsonl      one JSON object per captured frame (camera, frame id, time, score, ...)
    <pool>/labels.jsonl        optional operator labels (llb-edge label, trainer/label.py)

Written by runtime/capture.py: a frame file appears complete (hidden temp name, then a rename), and
its manifest line is appended after it. Read by trainer/label.py and llb_edge/retrain.py. An artifact
contract between the runtime and the trainer side, like runs.py and bundle.py: it lives here so that
neither side imports the other.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FRAMES_DIR = "frames"
MANIFEST_NAME = "manifest.jsonl"
IMAGE_SUFFIX = ".png"
IMAGE_GLOB = f"*{IMAGE_SUFFIX}"
TEMP_SUFFIX = ".tmp"


def manifest_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(raw line, parsed entry); a torn last line (crash mid-append) is skipped."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                yield (line if line.endswith("\n") else line + "\n"), entry


@dataclass(frozen=True)
class PoolFrame:
    """One frame in the pool: its file and what the daemon knew about it when it was captured."""

    file: str
    path: Path
    camera: str | None = None
    frame_id: int | str | None = None
    time: float | None = None
    score: float | None = None
    decision: str | None = None
    threshold: float | None = None
    model_id: str | None = None
    model_version: str | None = None
    reason: str | None = None
    p: float = 1.0  # probability it was captured with: retrain weighs it 1/p

    @property
    def weight(self) -> float:
        return 1.0 / self.p if self.p > 0 else 1.0


def read_pool(pool_dir: str | Path) -> list[PoolFrame]:
    """The frames present in a pool, sorted by file name (capture order), with manifest metadata.

    Manifest lines of evicted frames are ignored; a frame without a manifest line (a crash between
    the file's rename and the manifest append) is kept with unknown metadata and weight 1.
    """
    pool = Path(pool_dir)
    frames_dir = pool / FRAMES_DIR
    if not frames_dir.is_dir():
        raise FileNotFoundError(f"{pool} is not a capture pool: {frames_dir} does not exist")
    names = {path.name for path in frames_dir.glob(IMAGE_GLOB)}
    known = {f.name for f in dataclasses.fields(PoolFrame)} - {"file", "path"}
    meta: dict[str, dict[str, Any]] = {}
    for _, entry in manifest_lines(pool / MANIFEST_NAME):
        name = entry.get("file")
        if name in names:
            meta[name] = {key: value for key, value in entry.items() if key in known}
    frames = []
    for name in sorted(names):
        values = meta.get(name, {})
        p = values.pop("p", 1.0)
        frames.append(PoolFrame(file=name, path=frames_dir / name, p=float(p) if p else 1.0, **values))
    return frames
