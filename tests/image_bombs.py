"""Decompression bombs built byte by byte, without ever holding the image they decode to.

`png(w, h)`: a black 1-bit greyscale PNG (the zlib stream of its all-zero rows written in chunks:
20000 x 20000 is about 50 kB and decodes to 1.2 GB of RGB). `jpeg(w, h)`: a grey baseline JPEG
whose Huffman tables give every 8 x 8 block a 1-bit DC code and a 1-bit end-of-block (14000 x
14000 is 766 kB and decodes to 588 MB). At small sizes the same builders make ordinary images,
which is how the tests check that the bytes are valid.
"""

import struct
import zlib


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int) -> bytes:
    """A valid black PNG of width x height (bit depth 1, greyscale)."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed row
    rows_per_chunk = max(1, (4 << 20) // len(row))
    compressor = zlib.compressobj(9)
    parts = []
    for start in range(0, height, rows_per_chunk):
        parts.append(compressor.compress(row * min(rows_per_chunk, height - start)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_segment(marker: int, data: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(data) + 2) + data


def jpeg(width: int, height: int) -> bytes:
    """A valid uniformly grey (128) baseline greyscale JPEG of width x height."""
    one_code = bytes([1] + [0] * 15)  # BITS: a single code, of length 1 ("0")
    blocks = -(-width // 8) * -(-height // 8)
    bits = 2 * blocks  # per block: DC category 0 ("0") and AC end-of-block ("0")
    scan = bytearray(-(-bits // 8))
    if bits % 8:
        scan[-1] = (1 << (8 - bits % 8)) - 1  # pad the last byte with 1-bits
    return b"".join(
        [
            b"\xff\xd8",
            _jpeg_segment(0xDB, bytes([0]) + bytes([1] * 64)),  # quantisation table 0: all 1
            _jpeg_segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0])),
            _jpeg_segment(0xC4, bytes([0x00]) + one_code + bytes([0x00])),  # DC 0: category 0
            _jpeg_segment(0xC4, bytes([0x10]) + one_code + bytes([0x00])),  # AC 0: EOB
            _jpeg_segment(0xDA, bytes([1, 1, 0x00, 0, 63, 0])),
            bytes(scan),
            b"\xff\xd9",
        ]
    )
