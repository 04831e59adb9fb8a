"""Format and size of an encoded frame, read from the file's own header before any decoding.

The daemon must refuse an oversized image before a decoder allocates it: a 261 KB PNG can claim
16384 x 16384 pixels, and decoding first took a daemon from 281 MB to 1.2 GB. PNG keeps its size in
the IHDR chunk that must come first, JPEG in its frame header (an SOFn marker segment) before the
first scan. Only those leading segments are parsed, every length is checked against the data, and
anything unexpected raises :class:`ImageHeaderError` with the reason, so hostile bytes never read
past the buffer and never reach the decoder with a size the limits did not see.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Signatures of formats a camera may send by mistake, so a refusal can say what the bytes are.
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8", "jpeg"),
    (b"BM", "bmp"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)

PNG_SIGNATURE = SIGNATURES[0][0]
# PNG colour type -> (allowed bit depths, most channels OpenCV's IMREAD_UNCHANGED decodes it to).
# Truecolour and palette images become 4 channels when a tRNS chunk is present.
PNG_COLOR_TYPES = {
    0: ((1, 2, 4, 8, 16), 1),  # grey
    2: ((8, 16), 4),  # RGB
    3: ((1, 2, 4, 8), 4),  # palette (always 8-bit once expanded)
    4: ((8, 16), 4),  # grey + alpha
    6: ((8, 16), 4),  # RGBA
}
PNG_MAX_SIDE = 2**31 - 1  # the PNG specification's limit

# JPEG frame headers: SOF0-3, 5-7, 9-11, 13-15 (0xC4 DHT, 0xC8 JPG and 0xCC DAC are not frames).
JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_SOS, JPEG_EOI, JPEG_SOI = 0xDA, 0xD9, 0xD8
JPEG_TEM = 0x01
JPEG_RST_MARKERS = frozenset(range(0xD0, 0xD8))  # these and TEM stand alone: no length field


class ImageHeaderError(ValueError):
    """Bytes that are not a well-formed header of the expected image format; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageHeader:
    format: str  # the protocol's encoding name: png | jpeg
    height: int
    width: int
    channels: int  # the most channels the decoder may produce (alpha included)
    sample_bytes: int  # bytes per decoded channel value: 2 for 16-bit PNG and 12/16-bit JPEG

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def decoded_bytes(self) -> int:
        """Size of the decoder's output buffer, before any conversion to 8-bit RGB."""
        return self.pixels * self.channels * self.sample_bytes


def sniff_format(data: bytes | memoryview) -> str | None:
    """The format whose signature ``data`` starts with, or None."""
    head = bytes(data[:8])
    return next((name for signature, name in SIGNATURES if head.startswith(signature)), None)


def read_image_header(data: bytes | memoryview, expected_format: str) -> ImageHeader:
    """Size and depth of ``data``, which must be a file of ``expected_format`` (png or jpeg)."""
    readers = {"png": _png_header, "jpeg": _jpeg_header}
    if expected_format not in readers:
        raise ValueError(f"no header reader for {expected_format!r}; known: {', '.join(readers)}")
    view = memoryview(data).cast("B")
    found = sniff_format(view)
    if found != expected_format:
        what = f"a {found.upper()} file" if found else f"not an image file I know (it starts with {_hex_start(view)})"
        raise ImageHeaderError(f"payload labelled {expected_format} is {what}")
    return readers[expected_format](view)


def _hex_start(view: memoryview) -> str:
    return bytes(view[:8]).hex(" ") or "nothing"


def _png_header(view: memoryview) -> ImageHeader:
    # The IHDR chunk must come first: length 13, type, then width, height, depth, colour type, ...
    ihdr_end = len(PNG_SIGNATURE) + 8 + 13
    if len(view) < ihdr_end:
        raise ImageHeaderError(f"truncated PNG: {len(view)} bytes end inside its IHDR header")
    length, chunk_type, width, height, depth, color_type = struct.unpack_from(">I4sIIBB", view, len(PNG_SIGNATURE))
    if chunk_type != b"IHDR" or length != 13:
        raise ImageHeaderError(f"corrupt PNG: the first chunk is {chunk_type!r} of {length} bytes, not a 13-byte IHDR")
    if not (0 < width <= PNG_MAX_SIDE and 0 < height <= PNG_MAX_SIDE):
        raise ImageHeaderError(f"corrupt PNG: IHDR gives a size of {width}x{height}")
    depths, channels = PNG_COLOR_TYPES.get(color_type, ((), 0))
    if depth not in depths:
        raise ImageHeaderError(f"corrupt PNG: IHDR gives colour type {color_type} with bit depth {depth}")
    return ImageHeader("png", height, width, channels, 2 if depth == 16 else 1)


def _jpeg_header(view: memoryview) -> ImageHeader:
    """Walk the marker segments after SOI up to the first scan; the frame header must come first."""
    size = len(view)
    frame: ImageHeader | None = None
    position = 2
    while True:
        if position >= size:
            raise ImageHeaderError(f"truncated JPEG: {size} bytes end before {_missing(frame)}")
        if view[position] != 0xFF:
            raise ImageHeaderError(
                f"corrupt JPEG: byte {position} is 0x{view[position]:02X} where a marker should start"
            )
        while position < size and view[position] == 0xFF:  # 0xFF fill bytes may precede a marker
            position += 1
        if position >= size:
            raise ImageHeaderError(f"truncated JPEG: {size} bytes end before {_missing(frame)}")
        marker = view[position]
        position += 1
        if marker in JPEG_RST_MARKERS or marker == JPEG_TEM:
            continue
        if marker in (JPEG_EOI, JPEG_SOI, 0x00):
            name = {JPEG_EOI: "end-of-image", JPEG_SOI: "second start-of-image"}.get(marker, "invalid 0xFF00")
            raise ImageHeaderError(f"corrupt JPEG: {name} marker at byte {position - 2}, before {_missing(frame)}")
        if position + 2 > size:
            raise ImageHeaderError(f"truncated JPEG: {size} bytes end inside the 0xFF{marker:02X} segment")
        (length,) = struct.unpack_from(">H", view, position)
        if length < 2 or position + length > size:
            raise ImageHeaderError(
                f"truncated or corrupt JPEG: the 0xFF{marker:02X} segment at byte {position - 2} claims {length} "
                f"bytes, {size - position} are left"
            )
        if marker in JPEG_SOF_MARKERS and frame is None:
            frame = _jpeg_frame(view, position, length, marker)
        if marker == JPEG_SOS:
            if frame is None:
                raise ImageHeaderError("corrupt JPEG: a scan starts before any frame header (SOFn marker)")
            return frame
        position += length


def _missing(frame: ImageHeader | None) -> str:
    return "its first scan (start-of-scan marker)" if frame else "its frame header (SOFn marker)"


def _jpeg_frame(view: memoryview, position: int, length: int, marker: int) -> ImageHeader:
    if length < 8:
        raise ImageHeaderError(f"corrupt JPEG: frame header 0xFF{marker:02X} is {length} bytes, needs 8 or more")
    precision, height, width, components = struct.unpack_from(">BHHB", view, position + 2)
    if height == 0 or width == 0:
        # Height 0 means "given later by a DNL marker", which libjpeg does not support either.
        raise ImageHeaderError(f"unsupported JPEG: frame header gives a size of {width}x{height}")
    if components == 0 or length < 8 + 3 * components:
        raise ImageHeaderError(f"corrupt JPEG: frame header lists {components} components in {length} bytes")
    # Grey decodes to one channel; everything else (YCbCr, CMYK, ...) to 3, so count at least 3.
    channels = 1 if components == 1 else max(components, 3)
    return ImageHeader("jpeg", height, width, channels, 2 if precision > 8 else 1)
