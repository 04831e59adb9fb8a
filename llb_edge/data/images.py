"""Decoding images and masks: one path for training, evaluation and the line-side runtime.

Everything becomes uint8 HxWx3 RGB here, whatever the file holds (gray, RGB, RGBA, 8/16 bit), so
``transforms.Geometry`` sees one pixel format and an image scored on the line goes through exactly
the decode used in training (files via :func:`read_image_rgb`, network payloads via
:func:`decode_image_bytes`: same code, same flags).

OpenCV is used with ``IMREAD_UNCHANGED`` (no EXIF rotation, no implicit colour conversion: what
is in the file is what the model sees) on ``np.fromfile`` bytes, which also works for paths
OpenCV's own file API mishandles (non-ASCII names on Windows).

A corrupt file fails with :class:`ImageReadError` naming the file and the reason. Because one bad
file deep into a multi-hour run is expensive, :func:`validate_samples` decodes everything up front
and applies the ``data.on_bad_file`` policy: ``error`` lists all bad files at once, ``skip`` drops
them with a warning naming each.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from llb_edge.data.samples import DatasetSplit, Sample
from llb_edge.errors import LLBEdgeError

log = logging.getLogger(__name__)

# validate_samples shows a progress bar above this many samples.
PROGRESS_THRESHOLD = 200


class ImageReadError(LLBEdgeError, RuntimeError):
    """An image or mask that cannot be read; the message names the file(s) and the reason.

    ``ImageReadError(path, reason)`` for one file; ``bad`` holds every ``(path, reason)`` pair
    (several when raised by :func:`validate_samples`). ``ImageReadError(message)`` alone also
    works, so the error survives pickling and re-raising across worker processes.
    """

    def __init__(self, path: str | os.PathLike, reason: str | None = None,
                 *, bad: list[tuple[str, str]] | None = None) -> None:
        if reason is None:
            message = str(path)
            self.path, self.reason = "", message
        else:
            self.path, self.reason = str(path), reason
            message = f"cannot read image {self.path}: {reason}"
        self.bad = bad if bad is not None else ([(self.path, self.reason)] if self.path else [])
        super().__init__(message)


def _check_jpeg_complete(buf: np.ndarray, name: str) -> None:
    """Reject a JPEG that stops before its end-of-image marker (a truncated copy or upload).

    Some libjpeg builds decode such a file into a half-grey image with only a console warning;
    a model would then learn or score garbage silently. Entropy-coded data cannot contain
    0xFFD9/0xFFDA (0xFF bytes are stuffed), so an EOI after the last start-of-scan marker means the
    final scan is complete; trailing data after EOI (camera trailers) is still accepted.
    """
    data = buf.tobytes()
    last_sos = data.rfind(b"\xff\xda")
    if last_sos < 0:
        raise ImageReadError(name, "corrupt or truncated JPEG (no start-of-scan marker: no image data)")
    if data.find(b"\xff\xd9", last_sos) < 0:
        raise ImageReadError(name, "truncated JPEG (no end-of-image marker after the last scan)")


def _to_rgb_uint8(image: np.ndarray, name: str) -> np.ndarray:
    """Decoded OpenCV array (BGR order, any depth/channels) -> contiguous uint8 HxWx3 RGB."""
    if image.dtype == np.uint16:
        # Fixed full-range scaling (65535 -> 255), never per-image min/max: the line must see the
        # same mapping as training. 12-bit data stored in 16 bits therefore comes out dark.
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageReadError(name, f"unsupported pixel type {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif image.ndim == 3 and image.shape[2] == 3:
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        # Alpha is dropped, not composited: inspection images carry no meaningful transparency.
        rgb = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    else:
        raise ImageReadError(name, f"unsupported image layout {image.shape}")
    return np.ascontiguousarray(rgb)


def _decode(buf: np.ndarray, name: str) -> np.ndarray:
    """Decode raw file bytes with OpenCV, unchanged depth and channels; ImageReadError if not."""
    if buf.size == 0:
        raise ImageReadError(name, "empty file")
    if buf.size >= 2 and buf[0] == 0xFF and buf[1] == 0xD8:
        _check_jpeg_complete(buf, name)
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as err:
        raise ImageReadError(name, f"OpenCV could not decode it ({err})") from err
    if image is None or image.size == 0:
        raise ImageReadError(name, "not a decodable image (corrupt, truncated or unsupported format)")
    return image


def _read_bytes(path: str | os.PathLike) -> np.ndarray:
    try:
        return np.fromfile(str(path), dtype=np.uint8)
    except FileNotFoundError as err:
        raise ImageReadError(path, "file not found") from err
    except IsADirectoryError as err:
        raise ImageReadError(path, "is a directory, not an image file") from err
    except OSError as err:
        raise ImageReadError(path, f"{type(err).__name__}: {err.strerror or err}") from err


def read_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 HxWx3 RGB (gray/RGBA/16-bit converted, see module doc)."""
    name = str(path)
    return _to_rgb_uint8(_decode(_read_bytes(path), name), name)


def decode_image_bytes(data: bytes | memoryview, name: str = "<image bytes>") -> np.ndarray:
    """Decode an encoded image payload (JPEG/PNG/...) exactly like :func:`read_image_rgb`.

    The runtime receives frames as bytes; using the same decode keeps line scores equal to the
    scores the exported model was validated with. ``name`` appears in the error message.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    return _to_rgb_uint8(_decode(buf, name), name)


def read_mask(path: str | os.PathLike | None, height: int, width: int) -> np.ndarray:
    """Read a ground-truth mask as a bool HxW array aligned with its image.

    ``None`` (normal images, datasets without masks) gives all False. A pixel is defect when it is
    above half the intensity range (> 127 for 8-bit): method.md binarises masks at > 0.5, and
    MTD's anti-aliased edges and faint stray pixels would otherwise grow its masks by ~2.4%. A
    mask of another size than its image is resized nearest-neighbour so no new grey values appear.
    """
    if path is None:
        return np.zeros((height, width), dtype=bool)
    name = str(path)
    mask = _decode(_read_bytes(path), name)
    if mask.ndim == 3:
        if mask.shape[2] == 4:
            mask = mask[:, :, :3]
        mask = mask.max(axis=2)
    half = 127 if mask.dtype == np.uint8 else (32767 if mask.dtype == np.uint16 else 0.5)
    binary: np.ndarray = (mask > half).astype(np.uint8)
    if binary.shape != (height, width):
        binary = cv2.resize(binary, (width, height), interpolation=cv2.INTER_NEAREST)
    return binary.astype(bool)


def _check_sample(sample: Sample) -> list[tuple[str, str]]:
    """Decode one sample's image and mask; return the (path, reason) of each one that fails."""
    problems = []
    try:
        image = read_image_rgb(sample.path)
    except ImageReadError as err:
        problems.append((sample.path, err.reason))
        image = None
    if sample.mask_path is not None:
        try:
            h, w = image.shape[:2] if image is not None else (1, 1)
            read_mask(sample.mask_path, h, w)
        except ImageReadError as err:
            problems.append((sample.mask_path, f"{err.reason} (mask of {sample.path})"))
    return problems


def validate_samples(samples: Sequence[Sample], on_bad_file: str = "error",
                     workers: int | None = None) -> list[Sample]:
    """Decode every image and mask before a long run starts, and apply the bad-file policy.

    ``on_bad_file="error"`` raises one :class:`ImageReadError` listing *all* bad files (fixing
    them one rerun at a time is the thing to avoid); ``"skip"`` returns the samples without the
    bad ones, warning (``warnings`` and ``logging``) with each file named. A sample whose mask is
    bad is dropped as a whole: scoring it without its mask would be wrong. Decoding runs in a
    few threads (OpenCV releases the GIL); the order of the result is the input order.
    """
    if on_bad_file not in ("error", "skip"):
        raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
    samples = list(samples)
    workers = workers or min(8, os.cpu_count() or 1)
    show = len(samples) > PROGRESS_THRESHOLD
    if show:
        from tqdm import tqdm
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_check_sample, samples)
        if show:
            results = tqdm(results, total=len(samples), desc="checking images", unit="img")
        problems = list(results)
    bad = [item for found in problems for item in found]
    if not bad:
        return samples
    listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
    if on_bad_file == "error":
        raise ImageReadError(
            f"{len(bad)} unreadable file(s); fix or remove them, or set data.on_bad_file=skip:\n{listing}",
            bad=bad,
        )
    kept = [s for s, found in zip(samples, problems, strict=True) if not found]
    for path, reason in bad:
        log.warning("skipping unreadable file %s: %s", path, reason)
    warnings.warn(f"skipped {len(samples) - len(kept)} sample(s) with unreadable files:\n{listing}",
                  stacklevel=2)
    return kept


def validate_split(split: DatasetSplit, on_bad_file: str = "error") -> DatasetSplit:
    """:func:`validate_samples` over train and test together (one report, one error)."""
    kept = validate_samples([*split.train, *split.test], on_bad_file)
    if len(kept) == len(split.train) + len(split.test):
        return split
    keep = {id(s) for s in kept}
    return DatasetSplit(name=split.name, train=[s for s in split.train if id(s) in keep],
                        test=[s for s in split.test if id(s) in keep])

