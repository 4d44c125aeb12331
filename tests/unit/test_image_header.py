"""Image headers read without Pillow: the same format and size as Pillow's `Image.open` on real
files, never an image where Pillow saw none (every truncation of them), and bounded work on files
crafted to make a reader slow (compressed text, endless chunks, junk)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from gateway.requests.image_header import JUNK_BYTES, MAX_STEPS, read_header

_POLICY_NAMES = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}


def saved(mode: str, size: tuple[int, int], fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, "#3a7").save(buffer, fmt, **options)
    return buffer.getvalue()


def animated_webp() -> bytes:
    frames = [Image.new("RGBA", (40, 30), c) for c in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=50)
    return buffer.getvalue()


def texts() -> PngInfo:
    info = PngInfo()
    info.add_text("plain", "a" * 2000)
    info.add_text("compressed", "b" * 2000, zip=True)
    info.add_itxt("international", "c" * 2000, zip=True)
    return info


def with_exif_and_icc() -> bytes:
    image = Image.new("RGB", (33, 17), "white")
    exif = Image.Exif()
    exif[0x010F] = "maker"
    icc = b"\0" * 132 + b"x" * 70_000  # an ICC profile split over two APP2 segments
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes(), icc_profile=icc, comment=b"hello")
    return buffer.getvalue()


FILES = {
    "png rgb": saved("RGB", (64, 48), "PNG"),
    "png rgba": saved("RGBA", (7, 300), "PNG"),
    "png grey 16": saved("I;16", (31, 5), "PNG"),
    "png 1 bit": saved("1", (9, 9), "PNG"),
    "png palette": saved("P", (20, 10), "PNG", transparency=0),
    "png interlaced": saved("RGB", (50, 50), "PNG", interlace=1),
    "png with text": saved("RGB", (12, 34), "PNG", pnginfo=texts()),
    "jpeg": saved("RGB", (64, 48), "JPEG"),
    "jpeg grey": saved("L", (640, 1), "JPEG"),
    "jpeg cmyk": saved("CMYK", (30, 20), "JPEG"),
    "jpeg progressive": saved("RGB", (100, 70), "JPEG", progressive=True, optimize=True),
    "jpeg exif icc": with_exif_and_icc(),
    "webp lossy": saved("RGB", (64, 48), "WEBP"),
    "webp lossless": saved("RGBA", (65, 3), "WEBP", lossless=True),
    "webp alpha lossy": saved("RGBA", (16, 16), "WEBP", quality=50),
    "webp exif": saved("RGB", (21, 22), "WEBP", exif=b"Exif\0\0II*\0\x08\0\0\0\0\0\0\0\0\0"),
    "webp animated": animated_webp(),
    "gif": saved("P", (64, 48), "GIF"),
    "bmp": saved("RGB", (64, 48), "BMP"),
}


def pillow(data: bytes) -> tuple[str, int, int] | None:
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")) as image:
            return (_POLICY_NAMES.get(str(image.format), str(image.format).lower()), *image.size)
    except Exception:
        return None


def ours(data: bytes) -> tuple[str, int, int] | None:
    return read_header(io.BytesIO(data), len(data))


@pytest.mark.parametrize("name", list(FILES))
def test_the_format_and_size_are_pillows(name: str) -> None:
    data = FILES[name]
    assert ours(data) == pillow(data) is not None


def prefixes(data: bytes) -> Iterator[bytes]:
    step = max(1, len(data) // 400)  # every length for small files, 400 of them for larger ones
    yield from (data[:n] for n in range(0, len(data), step))


@pytest.mark.parametrize("name", [n for n in FILES if n.split()[0] in ("png", "jpeg", "webp")])
def test_no_truncation_is_an_image_where_pillow_saw_none(name: str) -> None:
    """What the models take (png, jpeg, webp): whatever this reads as an image, Pillow opened as the
    same image; so nothing Pillow refused gets through."""
    for prefix in prefixes(FILES[name]):
        found = ours(prefix)
        assert found is None or found == pillow(prefix), len(prefix)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


IHDR = chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 2, 8, 2, 0, 0, 0))
PIXELS = chunk(b"IDAT", zlib.compress(b"\0" * 20)) + chunk(b"IEND", b"")


class Counting(io.BytesIO):
    """A file that counts the bytes read from it."""

    read_bytes = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.read_bytes += len(data)
        return data


def test_compressed_text_is_never_inflated() -> None:
    """60 zTXt chunks of 1 MB each inflated (the review's 60 KB file): only chunk heads are read."""
    text = zlib.compress(b"\0" * 1_000_000, 9)
    png = b"\x89PNG\r\n\x1a\n" + IHDR + b"".join(chunk(b"zTXt", b"k\0\0" + text) for _ in range(60)) + PIXELS
    file = Counting(png)
    assert read_header(file, len(png)) == ("png", 3, 2)
    assert file.read_bytes <= 40 + 61 * 8  # the header, then 8 bytes a chunk to IDAT


def test_a_png_with_endless_chunks_is_refused_after_max_steps() -> None:
    many = b"\x89PNG\r\n\x1a\n" + IHDR + chunk(b"tEXt", b"k\0v") * MAX_STEPS + PIXELS
    assert ours(many) is None
    assert pillow(many) == ("png", 3, 2)  # Pillow walked them all
    fewer = b"\x89PNG\r\n\x1a\n" + IHDR + chunk(b"tEXt", b"k\0v") * (MAX_STEPS - 1) + PIXELS
    assert ours(fewer) == ("png", 3, 2)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda png: png[:29] + b"\0\0\0\0" + png[33:],  # IHDR's checksum
        lambda png: png[:24] + b"\x10\x02" + png[26:],  # 16-bit colour type 2 is fine, 3 is not
        lambda png: png[:8] + png[33:],  # no IHDR
    ],
)
def test_a_broken_png_header_is_no_image(mangle: object) -> None:
    png = b"\x89PNG\r\n\x1a\n" + IHDR + PIXELS
    assert callable(mangle)
    broken = mangle(png)
    if broken[24:26] == b"\x10\x02":  # the valid variant: re-checksummed it is an image
        broken = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", broken[16:24] + b"\x10\x03\0\0\0") + PIXELS
    assert ours(broken) is None and pillow(broken) is None


def test_jpeg_junk_and_segments_are_bounded() -> None:
    jpeg = FILES["jpeg"]
    padded = jpeg[:20] + b"\x00" * 100 + jpeg[20:]  # junk after APP0, which Pillow skips
    assert ours(padded) == pillow(padded) == ("jpeg", 64, 48)
    flood = jpeg[:20] + b"\x00" * (JUNK_BYTES + 1) + jpeg[20:]
    assert ours(flood) is None
    comments = jpeg[:2] + b"\xff\xfe\x00\x03c" * MAX_STEPS + jpeg[2:]
    assert ours(comments) is None and pillow(comments) == ("jpeg", 64, 48)


def test_a_jpeg_pillow_cannot_open_is_no_image() -> None:
    twelve_bit = FILES["jpeg"].replace(b"\xff\xc0\x00\x11\x08", b"\xff\xc0\x00\x11\x0c", 1)
    assert ours(twelve_bit) is None and pillow(twelve_bit) is None


def test_other_files() -> None:
    assert ours(b"hello, not a png") is None
    assert ours(b"") is None
    assert ours(b"II*\x00" + b"\0" * 40) == ("tiff", 0, 0)
