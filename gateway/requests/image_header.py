"""What an uploaded file is, from its first bytes: format and dimensions, read without decoding.

The policy needs only the format (png, jpeg, webp; gif, bmp and tiff are named to be refused) and
the dimensions (tokens, square images, the mask's size). Pillow's `Image.open` does more than read a
header: a PNG's every compressed text chunk is inflated (60 MB from a 60 KB file), a JPEG's junk is
skipped a byte at a time in Python, a WebP is read whole into a demuxer; all on the event loop. Here
each format is read by seeking over its structure, never inflating or copying what it does not need,
and the work per file is bounded (`MAX_STEPS` chunks or segments, `JUNK_BYTES` skipped): a file that
needs more is no image we read (refused like one Pillow cannot open).

The checks are the ones Pillow made before it would open a file: a PNG's signature, IHDR (its
checksum, a valid depth and colour type) and every chunk whole up to the first IDAT; a JPEG's
segments whole up to the start of scan, an 8-bit frame of 1, 3 or 4 components, whole quantization
tables; a WebP's RIFF container whole and its first image chunk. So what this reads as an image,
Pillow opened with the same format and size (tests/unit/test_image_header.py: real files and every
truncation of them). Not checked: the checksums and contents of PNG chunks other than IHDR, and
what libwebp checks beyond the first chunk; the upstream reads the pixels and refuses a corrupt
file. Refused although Pillow opened them: more than `MAX_STEPS` chunks or segments before the
pixels, more than `JUNK_BYTES` of junk between two JPEG segments, more than four quantization tables
in one segment, a PNG without IDAT.
"""

from __future__ import annotations

import struct
import zlib
from typing import IO

MAX_STEPS = 512  # chunks (PNG) or segments (JPEG) before the pixels: real files have a few dozen
JUNK_BYTES = 4096  # bytes skipped between two JPEG segments (some writers leave padding)
_PNG = b"\x89PNG\r\n\x1a\n"
# PNG bit depths allowed for each colour type (PNG spec, 11.2.2 IHDR)
_PNG_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...): they carry the size
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# markers without a length (RSTn, SOI, EOI, JPG, JPGn): Pillow reads on after them
_STANDALONE = frozenset({0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})
_MAX_DIMENSION = 2**31 - 1

Header = tuple[str, int, int]  # format (lower case, the policy's names), width, height


def read_header(file: IO[bytes], size: int) -> Header | None:
    """The format and dimensions of the `size`-byte `file` (read from its start), or None when it is
    not an image this reads."""
    file.seek(0)
    head = file.read(40)  # the longest header read here (PNG: signature, IHDR) fits
    try:
        if head.startswith(_PNG):
            return _png(file, size, head)
        if head.startswith(b"\xff\xd8\xff"):
            return _jpeg(file, size)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp(file, size, head)
    except (struct.error, ValueError):  # a field cut short by the end of the file
        return None
    return _other(head)


def _png(file: IO[bytes], size: int, head: bytes) -> Header | None:
    """The signature, then IHDR (checked as Pillow checks it), then chunk headers up to IDAT."""
    length, kind = struct.unpack_from(">I4s", head, 8)
    ihdr = head[16:29]
    if kind != b"IHDR" or length != 13 or len(head) < 33:
        return None
    width, height, depth, colour, compression, filters, interlace = struct.unpack(">IIBBBBB", ihdr)
    if (zlib.crc32(head[12:29]) & 0xFFFFFFFF) != struct.unpack_from(">I", head, 29)[0]:
        return None
    if depth not in _PNG_DEPTHS.get(colour, ()) or compression or filters or interlace > 1:
        return None
    if not 0 < width <= _MAX_DIMENSION or not 0 < height <= _MAX_DIMENSION:
        return None
    position = 33
    for _ in range(MAX_STEPS):  # walk to the pixels: a file cut before them is refused, as Pillow did
        file.seek(position)
        length, kind = struct.unpack(">I4s", file.read(8))
        if not kind.isalpha():
            return None
        if kind == b"IDAT":
            return ("png", width, height)
        position += 12 + length
        if position > size:
            return None
    return None


def _jpeg(file: IO[bytes], size: int) -> Header | None:
    """Markers from SOI to the start of scan, as Pillow walks them, each segment skipped by its
    length: the size is the last start of frame's; an end of file between segments ends the walk."""
    file.seek(2)
    found: Header | None = None
    byte = file.read(1)
    for _ in range(MAX_STEPS):
        if byte != b"\xff":  # junk before the next marker, which Pillow skips
            junk = file.read(JUNK_BYTES)
            if (skip := junk.find(b"\xff")) < 0:
                return found if len(junk) < JUNK_BYTES else None  # the end of the file, or too much
            file.seek(skip + 1 - len(junk), 1)
        marker = file.read(1)
        if not marker:
            return found
        code = marker[0]
        if code == 0xFF:  # fill: the second 0xFF may start the marker
            byte = marker
            continue
        if code == 0x00:  # an escaped 0xFF outside a segment: junk
            byte = file.read(1)
            continue
        if code < 0xC0:
            return None
        if code not in _STANDALONE:
            (length,) = struct.unpack(">H", file.read(2))
            start, segment = file.tell(), max(0, length - 2)
            if start + segment > size:  # cut short: Pillow reads every segment whole
                return None
            if code in _SOF:
                found = _frame(file.read(min(segment, 6)))
                if found is None:
                    return None
            elif code in _CHECKED and not _CHECKED[code](file, segment):
                return None
            if code == 0xDA:  # the pixels start: everything about the frame has been said
                return found
            file.seek(start + segment)
        byte = file.read(1)
    return None


def _frame(data: bytes) -> Header | None:
    """A start of frame: 8-bit samples in 1, 3 or 4 components, the only JPEGs Pillow opens."""
    precision, height, width, components = struct.unpack_from(">BHHB", data)
    if precision != 8 or components not in (1, 3, 4) or not width or not height:
        return None
    return ("jpeg", width, height)


def _tables(file: IO[bytes], segment: int) -> bool:
    """Quantization tables, each whole (1 + 64 or 128 bytes by its precision): at most four in a
    segment (there are four table slots), so that a file cannot make this loop long."""
    if segment > 4 * 129:
        return False
    data, position = file.read(segment), 0
    while position < len(data):
        position += 1 + (64 if data[position] < 16 else 128)
        if position > len(data):
            return False
    return True


def _app(file: IO[bytes], segment: int) -> bool:
    """APP0 and APP14: Pillow reads JFIF's version and Adobe's from them."""
    return segment >= 7 or not file.read(segment).startswith((b"JFIF", b"Adobe"))


# The segments whose contents Pillow reads (a start of frame aside), and what it needs of them
_CHECKED = {0xDB: _tables, 0xE0: _app, 0xEE: _app}


def _webp(file: IO[bytes], size: int, head: bytes) -> Header | None:
    """The RIFF container (whole in the file, as libwebp's demuxer wants it) and its first chunk:
    VP8X (the canvas), VP8L (lossless) or VP8 (lossy)."""
    (riff,) = struct.unpack_from("<I", head, 4)
    length, kind = struct.unpack_from("<I", head, 16)[0], head[12:16]
    if riff + 8 > size or riff < 4 + 8 + length or riff % 2:
        return None
    body = head[20:30]
    if kind == b"VP8X" and length >= 10:
        width = 1 + int.from_bytes(body[4:7], "little")
        height = 1 + int.from_bytes(body[7:10], "little")
    elif kind == b"VP8L" and length >= 5 and body[0] == 0x2F:
        (bits,) = struct.unpack_from("<I", body, 1)
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    elif kind == b"VP8 " and length >= 10 and body[3:6] == b"\x9d\x01\x2a":
        width, height = (v & 0x3FFF for v in struct.unpack_from("<HH", body, 6))
    else:
        return None
    return ("webp", width, height) if width and height else None


def _other(head: bytes) -> Header | None:
    """Formats no model takes, named so that the refusal says what the file is."""
    if head[:6] in (b"GIF87a", b"GIF89a"):
        width, height = struct.unpack_from("<HH", head, 6)
        return ("gif", width, height)
    if head[:2] == b"BM" and len(head) >= 26:
        width, height = struct.unpack_from("<ii", head, 18)
        return ("bmp", abs(width), abs(height))
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return ("tiff", 0, 0)  # no model takes it: its size is never asked
    return None
