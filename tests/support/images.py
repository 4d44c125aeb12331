"""Image files for upload tests."""

from __future__ import annotations

import io
import random

from PIL import Image


def noise_png(width: int, height: int) -> bytes:
    """An RGBA png of random pixels (the same each time): it does not compress, so its size is about
    4 bytes a pixel (1100x1100 is over 4 MiB, the bound on a mask)."""
    buffer = io.BytesIO()
    pixels = random.Random(7).randbytes(width * height * 4)
    Image.frombytes("RGBA", (width, height), pixels).save(buffer, "PNG")
    return buffer.getvalue()
