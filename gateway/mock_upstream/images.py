"""Cheap, real images: solid shapes encoded once per spec, optionally padded, kept in a small LRU.

Each image decodes with Pillow at the requested size and format. With a byte target the encoded
file carries incompressible filler where decoders skip it (a PNG ancillary chunk, JPEG comment
segments, a WebP XMP chunk), so a b64 payload of tens of MB costs one encode, not a huge render.
Encoding runs in a worker thread; concurrent requests for one spec share a single encode.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image

_COLOURS = ((38, 110, 190), (120, 120, 120), (150, 150, 150), (180, 180, 180))  # final, then partials
_ACCENT = (240, 170, 40)
_PNG_PAD_TYPE = b"mkPd"  # ancillary, private, safe-to-copy: decoders skip it
_JPEG_SEGMENT = 65533  # largest payload of one COM segment
_WEBP_XMP_OVERHEAD = 26  # VP8X chunk (18) plus the XMP chunk header (8)


@dataclass(frozen=True, slots=True)
class ImageSpec:
    width: int
    height: int
    output_format: str  # png | jpeg | webp
    transparent: bool
    variant: int = 0  # 0 for final images, 1.. for partial images (a different grey each)
    b64_bytes: int | None = None  # pad so the base64 text is about this long


def render_b64(spec: ImageSpec) -> bytes:
    """The image for `spec`, encoded and base64'd (ASCII bytes). CPU-bound: run it off the loop."""
    image = _draw(spec)
    raw = _encode(image, spec.output_format)
    if spec.b64_bytes is not None:
        raw = _pad(image, raw, spec.output_format, spec.b64_bytes * 3 // 4)
    return base64.b64encode(raw)


def _draw(spec: ImageSpec) -> Image.Image:
    size = (spec.width, spec.height)
    colour = _COLOURS[spec.variant % len(_COLOURS)]
    box = (spec.width // 4, spec.height // 4, 3 * spec.width // 4, 3 * spec.height // 4)
    if spec.transparent and spec.output_format != "jpeg":
        image = Image.new("RGBA", size, (0, 0, 0, 0))
        image.paste((*colour, 255), box)
        return image
    image = Image.new("RGB", size, colour)
    image.paste(_ACCENT, box)
    return image


def _encode(image: Image.Image, output_format: str, xmp: bytes | None = None) -> bytes:
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, "PNG", compress_level=1)
    elif output_format == "jpeg":
        image.save(buffer, "JPEG", quality=85)
    elif xmp is None:
        image.save(buffer, "WEBP", quality=80, method=0)
    else:
        image.save(buffer, "WEBP", quality=80, method=0, xmp=xmp)
    return buffer.getvalue()


def _filler(size: int) -> bytes:
    return random.Random(size).randbytes(max(0, size))


def _pad(image: Image.Image, raw: bytes, output_format: str, target: int) -> bytes:
    """Grow `raw` to about `target` bytes with data every decoder ignores; never shrink it."""
    if output_format == "png" and target > len(raw) + 12:
        data = _filler(target - len(raw) - 12)
        chunk = struct.pack(">I", len(data)) + _PNG_PAD_TYPE + data
        chunk += struct.pack(">I", zlib.crc32(_PNG_PAD_TYPE + data))
        return raw[:-12] + chunk + raw[-12:]  # the last 12 bytes are the IEND chunk
    if output_format == "jpeg" and target > len(raw) + 4:
        data = _filler(target - len(raw))
        pieces = [data[i : i + _JPEG_SEGMENT] for i in range(0, len(data), _JPEG_SEGMENT)]
        pieces[-1] = pieces[-1][: max(0, len(pieces[-1]) - 4 * len(pieces))]  # room for segment headers
        segments = b"".join(b"\xff\xfe" + struct.pack(">H", len(p) + 2) + p for p in pieces)
        return raw[:2] + segments + raw[2:]  # right after SOI
    if output_format == "webp" and target > len(raw) + _WEBP_XMP_OVERHEAD:
        return _encode(image, "webp", xmp=_filler(target - len(raw) - _WEBP_XMP_OVERHEAD))
    return raw


class ImageCache:
    """A bounded LRU of base64 images, one per `ImageSpec`, owned by one app."""

    def __init__(self, max_entries: int = 24) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[ImageSpec, asyncio.Task[bytes]] = OrderedDict()
        self._running: set[asyncio.Task[bytes]] = set()  # includes encodes evicted before finishing

    async def b64(self, spec: ImageSpec) -> bytes:
        task = self._entries.get(spec)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(render_b64, spec))
            task.add_done_callback(lambda done: self._finished(spec, done))
            self._running.add(task)
            self._entries[spec] = task
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(spec)
        return await asyncio.shield(task)  # a leaving client must not cancel a shared encode

    def _finished(self, spec: ImageSpec, task: asyncio.Task[bytes]) -> None:
        self._running.discard(task)
        if (task.cancelled() or task.exception() is not None) and self._entries.get(spec) is task:
            del self._entries[spec]

    async def close(self) -> None:
        """Wait for encodes still running so no thread outlives the app."""
        await asyncio.gather(*self._running, return_exceptions=True)
        self._entries.clear()
