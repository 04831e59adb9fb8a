"""`llb-edge label POOL FRAME... --ok/--ng`: operator labels for captured pool frames.

Labels are optional. Retrain never trains on a labelled frame (training is unsupervised and LLB
handles defects in the pool); it evaluates both the candidate and the current model on them, so a
candidate that misses defects an operator flagged is caught by the gate. No torch here: labelling
happens on the line PC where the pool lives.

``<pool>/labels.jsonl`` is append-only, one ``{"file", "label", "by", "at"}`` per line; the last line
for a file wins, and ``label: null`` clears it. Appending (not rewriting) keeps who labelled what.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from llb_edge.bundle import operator_name, utc_now
from llb_edge.errors import LLBEdgeError
from llb_edge.pool import PoolFrame, read_pool

LABELS_NAME = "labels.jsonl"
LABELS = ("OK", "NG")


class LabelError(LLBEdgeError, ValueError):
    """A label request naming frames that are not in the pool, or an unknown label."""


def _matches(frame: PoolFrame, ref: str) -> bool:
    name = Path(ref).name
    if name in (frame.file, Path(frame.file).stem):
        return True
    # camera/frame_id: camera ids cannot contain '/', frame ids can, so split at the first one.
    camera, _, frame_id = ref.partition("/")
    return bool(frame_id) and frame.camera == camera and str(frame.frame_id) == frame_id


def resolve_frames(pool_dir: str | Path, refs: Sequence[str]) -> list[PoolFrame]:
    """Pool frames named by file name, file stem, path, or ``camera/frame_id`` (all matches)."""
    frames = read_pool(pool_dir)
    found: dict[str, PoolFrame] = {}
    missing = []
    for ref in refs:
        hits = [frame for frame in frames if _matches(frame, ref)]
        if not hits:
            missing.append(ref)
        found.update({frame.file: frame for frame in hits})
    if missing:
        raise LabelError(f"not in pool {pool_dir}: {', '.join(missing)} (name frames by file name or camera/frame_id)")
    return sorted(found.values(), key=lambda f: f.file)


def label_frames(
    pool_dir: str | Path, refs: Sequence[str], label: str | None, by: str | None = None
) -> list[str]:
    """Mark frames OK or NG (``None`` clears their label); returns the file names labelled."""
    if label is not None:
        label = label.upper()
        if label not in LABELS:
            raise LabelError(f"label must be OK or NG, got {label!r}")
    frames = resolve_frames(pool_dir, refs)
    who, when = by or operator_name(), utc_now()
    lines = "".join(json.dumps({"file": f.file, "label": label, "by": who, "at": when}) + "\n" for f in frames)
    with open(Path(pool_dir) / LABELS_NAME, "a", encoding="utf-8") as handle:
        handle.write(lines)
        handle.flush()
        os.fsync(handle.fileno())
    return [f.file for f in frames]


def read_labels(pool_dir: str | Path) -> dict[str, str]:
    """{file name: "OK" | "NG"} for every labelled frame (last label wins; cleared ones left out)."""
    path = Path(pool_dir) / LABELS_NAME
    labels: dict[str, str] = {}
    if not path.is_file():
        return labels
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if not isinstance(entry, dict) or "file" not in entry:
            continue
        if entry.get("label") in LABELS:
            labels[str(entry["file"])] = str(entry["label"])
        else:
            labels.pop(str(entry["file"]), None)
    return labels
