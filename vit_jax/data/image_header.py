"""An encoded image's pixel count read from its header, so that an image too large to decode is
refused before any decoder runs.

A decompression bomb is a small file that decodes to gigabytes: a 1 MB PNG of 20000 x 20000
pixels decodes to 1.2 GB of RGB. The only defence is to read the size from the header and refuse
above a pixel cap (`DEFAULT_MAX_PIXELS`; each CLI's `--max-pixels`) before decoding.

The headers are parsed here, for exactly the formats `preprocess.decode_image` decodes (JPEG,
PNG, GIF, BMP, WebP), told apart by the same leading bytes TensorFlow's decoder dispatches on.
PIL's `Image.open` would read them too, but it raises `DecompressionBombError` above twice its
process-wide `Image.MAX_IMAGE_PIXELS` (and warns above it): lifting that global around one read
is not thread-safe in the server, and PIL's idea of a file's format need not be TensorFlow's.
Reading stops at the size field, except for GIF: TensorFlow's decoder expands every frame, so
its blocks are walked (skipped, never decompressed) to add up the frames.
"""

from __future__ import annotations

import dataclasses
import io
import struct
from collections.abc import Iterable
from typing import BinaryIO

from vit_jax.data.errors import DataError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "HeaderError",
    "ImageSize",
    "ImageTooLargeError",
    "check_files",
    "check_pixels",
    "open_file",
    "read_size",
]

# 64 megapixels (an 8000 x 8000 photo): above every camera's output, below PIL's own bomb warning
# (Image.MAX_IMAGE_PIXELS, 89.5 Mpx). Decoding one costs about 4 bytes a pixel for JPEG / PNG /
# WebP / GIF and up to 20 for BMP (decoded by PIL), i.e. 0.26-1.3 GB at this cap.
DEFAULT_MAX_PIXELS = 64_000_000


@dataclasses.dataclass(frozen=True)
class ImageSize:
    """What a header says: format, width, height, and the pixels the decoder will produce
    (`width * height`; for an animated GIF the frames' sum when that is larger)."""

    format: str
    width: int
    height: int
    frames: int = 1
    frame_pixels: int = 0  # GIF: sum of the frames' own areas

    @property
    def pixels(self) -> int:
        return max(self.width * self.height, self.frame_pixels)

    def describe(self) -> str:
        """`20000x20000 pixels` (for a GIF also its frames, and the pixels its frames decode to
        when they are more)."""
        text = f"{self.width}x{self.height} pixels"
        if self.frames > 1:
            text += f" in {self.frames} frames"
        if self.pixels > self.width * self.height:
            text += f" ({self.pixels} pixels decoded)"
        return text


class HeaderError(DataError):
    """Bytes that start as an image format but whose header cannot be read."""


class ImageTooLargeError(DataError):
    """An image whose header says it has more pixels than the cap; nothing was decoded."""

    def __init__(self, what: str, size: ImageSize, max_pixels: int):
        super().__init__(f"{what}: {size.describe()}, more than --max-pixels {max_pixels}")
        self.what = what
        self.size = size
        self.max_pixels = max_pixels


def check_pixels(source: bytes | BinaryIO, what: str, max_pixels: int | None) -> ImageSize | None:
    """The header's `ImageSize` (None: not a format decode_image knows, left to it to refuse).

    Raises ImageTooLargeError above `max_pixels` (None: no cap) and HeaderError (both
    ValueErrors naming `what`) for a known format whose header does not read.
    """
    try:
        size = read_size(source)
    except HeaderError as e:
        raise HeaderError(f"{what}: not a readable image ({e})") from None
    if size is not None and max_pixels is not None and size.pixels > max_pixels:
        raise ImageTooLargeError(what, size, max_pixels)
    return size


def open_file(path: str) -> BinaryIO:
    """`path` opened for reading bytes: a local file, or any filesystem TensorFlow reads
    (`gs://...`)."""
    if "://" in path:
        import tensorflow as tf  # here: the CLIs read this module while parsing their flags

        return tf.io.gfile.GFile(path, "rb")
    return open(path, "rb")  # noqa: SIM115 - the caller's `with` closes it


def check_files(paths: Iterable[str], max_pixels: int | None) -> None:
    """Raises the ImageTooLargeError of the first file over `max_pixels`, from the headers
    alone, before any of them is decoded (what a CLI checks before it starts). Files that cannot
    be opened or whose header does not read are left to the decoding that follows to report."""
    if max_pixels is None:
        return
    import tensorflow as tf

    for path in paths:
        try:
            with open_file(path) as f:
                check_pixels(f, path, max_pixels)
        except (HeaderError, OSError, tf.errors.OpError):
            continue


def read_size(source: bytes | BinaryIO) -> ImageSize | None:
    """The size in the header of encoded image bytes or a binary file opened at its start.

    None when the leading bytes are none of JPEG, PNG, GIF, BMP, WebP; HeaderError when they are
    one of them but the header is cut short or malformed. Reads no pixel data.
    """
    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    start = f.read(12)
    if start.startswith(b"\xff\xd8\xff"):
        return _jpeg(f)
    if start.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(f, start)
    if start.startswith(b"GIF8"):
        return _gif(f, start)
    if start.startswith(b"BM"):
        return _bmp(f, start)
    if start.startswith(b"RIFF") and start[8:12] == b"WEBP":
        return _webp(f)
    return None


def _exactly(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise HeaderError(f"{what} cut short")
    return data


def _png(f: BinaryIO, start: bytes) -> ImageSize:
    head = start + _exactly(f, 24 - len(start), "PNG header")
    if head[12:16] != b"IHDR":
        raise HeaderError("PNG without IHDR chunk first")
    width, height = struct.unpack(">II", head[16:24])
    return ImageSize("PNG", width, height)


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic);
# C4 (DHT), C8 (JPG) and CC (DAC) in that range are not frames.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_NO_LENGTH = frozenset([0x01, *range(0xD0, 0xD9)])  # TEM, RSTn, SOI


def _jpeg(f: BinaryIO) -> ImageSize:
    """Walks the marker segments to the first start-of-frame, as libjpeg does (fill bytes and
    stray bytes between segments skipped)."""
    f.seek(2)
    while True:
        byte = f.read(1)
        while byte and byte != b"\xff":  # stray data before a marker (libjpeg skips it too)
            byte = f.read(1)
        while byte == b"\xff":  # fill bytes
            byte = f.read(1)
        if not byte:
            raise HeaderError("JPEG without a frame header (SOF) before its end")
        marker = byte[0]
        if marker in _JPEG_NO_LENGTH:
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS: the frame header must come before
            raise HeaderError("JPEG without a frame header (SOF) before its scan")
        (length,) = struct.unpack(">H", _exactly(f, 2, "JPEG segment"))
        if length < 2:
            raise HeaderError(f"JPEG segment of length {length}")
        if marker in _JPEG_FRAMES:
            frame = _exactly(f, 5, "JPEG frame header")
            _, height, width = struct.unpack(">BHH", frame)
            return ImageSize("JPEG", width, height)
        f.seek(length - 2, io.SEEK_CUR)


def _gif(f: BinaryIO, start: bytes) -> ImageSize:
    """The logical screen and every frame's own area (each frame is expanded by the decoder,
    and a frame may be larger than the screen). A stream cut short counts the frames begun."""
    head = start + _exactly(f, 13 - len(start), "GIF header")
    width, height, flags = struct.unpack("<HHB", head[6:11])
    if flags & 0x80:
        f.seek(3 << ((flags & 7) + 1), io.SEEK_CUR)  # global colour table
    frames = frame_pixels = 0
    while True:
        kind = f.read(1)
        if kind == b"\x2c":  # image descriptor
            desc = f.read(9)
            if len(desc) < 9:
                break
            w, h, flags = struct.unpack("<HHB", desc[4:9])
            frames += 1
            frame_pixels += w * h
            if flags & 0x80:
                f.seek(3 << ((flags & 7) + 1), io.SEEK_CUR)  # local colour table
            f.seek(1, io.SEEK_CUR)  # LZW minimum code size
        elif kind == b"\x21":  # extension: label, then sub-blocks
            f.seek(1, io.SEEK_CUR)
        else:  # trailer (0x3b), end of data or garbage: the decoder stops here too
            break
        if not _skip_sub_blocks(f):
            break
    return ImageSize("GIF", width, height, max(frames, 1), frame_pixels)


def _skip_sub_blocks(f: BinaryIO) -> bool:
    """Skips data sub-blocks up to their terminator; False when the data ends first."""
    while True:
        size = f.read(1)
        if not size:
            return False
        if size == b"\0":
            return True
        f.seek(size[0], io.SEEK_CUR)


def _bmp(f: BinaryIO, start: bytes) -> ImageSize:
    """BITMAPCOREHEADER (16-bit sizes) or BITMAPINFOHEADER and its successors (32-bit; a
    negative height is a top-down bitmap). The width is read unsigned, as PIL reads it."""
    head = start + _exactly(f, 26 - len(start), "BMP header")
    (header_size,) = struct.unpack("<I", head[14:18])
    if header_size == 12:
        width, height = struct.unpack("<HH", head[18:22])
    elif header_size in (40, 52, 56, 64, 108, 124):
        width, height = struct.unpack("<Ii", head[18:26])
        height = abs(height)
    else:
        raise HeaderError(f"BMP header of {header_size} bytes")
    return ImageSize("BMP", width, height)


def _webp(f: BinaryIO) -> ImageSize:
    """The first chunk: VP8X (the canvas), VP8 (lossy key frame) or VP8L (lossless)."""
    chunk = _exactly(f, 8, "WebP chunk header")[:4]
    body = _exactly(f, 10, f"WebP {chunk.decode('latin-1').strip()} header")
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(body[4:7], "little")
        height = 1 + int.from_bytes(body[7:10], "little")
    elif chunk == b"VP8 ":
        if body[3:6] != b"\x9d\x01\x2a":
            raise HeaderError("WebP VP8 without a key frame")
        width, height = (v & 0x3FFF for v in struct.unpack("<HH", body[6:10]))
    elif chunk == b"VP8L":
        if body[0] != 0x2F:
            raise HeaderError("WebP VP8L without its signature")
        bits = int.from_bytes(body[1:5], "little")
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    else:
        raise HeaderError(f"WebP starting with chunk {chunk!r}")
    return ImageSize("WebP", width, height)
