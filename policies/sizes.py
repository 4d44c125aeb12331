"""Image sizes as `WIDTHxHEIGHT` strings: parsing, gpt-image-2's arbitrary-size rule, nearest sizes.

Owns the arithmetic of sizes only; which sizes a model lists lives in the catalog, which a tenant may
use in its policy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field

_WXH = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")
_MAX_SIZE_CHARS = 13


def parse(size: object) -> tuple[int, int] | None:
    """`(width, height)` of a `WxH` string, or None for anything else (`auto`, junk, non-strings)."""
    # the longest size `_WXH` takes is 13 characters: a longer string is no size, and is not cached
    return _parse(size) if isinstance(size, str) and len(size) <= _MAX_SIZE_CHARS else None


@lru_cache(maxsize=4096)  # a request asks about a handful of sizes a dozen times over
def _parse(size: str) -> tuple[int, int] | None:
    match = _WXH.fullmatch(size)
    return (int(match.group(1)), int(match.group(2))) if match else None


def pixels(size: object) -> int | None:
    parsed = parse(size)
    return parsed[0] * parsed[1] if parsed else None


class SizeRule(BaseModel):
    """gpt-image-2's rule for arbitrary `WxH` sizes (FACTS.md section 1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    multiple_of: int = Field(default=16, ge=1)
    max_aspect: float = Field(default=3.0, ge=1.0)  # longest edge / shortest edge
    max_edge: int = Field(default=3840, ge=1)
    min_pixels: int = Field(default=655_360, ge=1)
    max_pixels: int = Field(default=8_294_400, ge=1)

    def problems(self, width: int, height: int) -> list[str]:
        """Each way `width x height` breaks the rule, as readable phrases (empty when it fits)."""
        found = []
        if width % self.multiple_of or height % self.multiple_of:
            found.append(f"width and height must be multiples of {self.multiple_of}")
        if max(width, height) > self.max_aspect * min(width, height):
            found.append(f"the aspect ratio must be between 1:{self.max_aspect:g} and {self.max_aspect:g}:1")
        if max(width, height) > self.max_edge:
            found.append(f"the longest edge must be at most {self.max_edge}")
        if not self.min_pixels <= width * height <= self.max_pixels:
            found.append(f"the pixel count must be between {self.min_pixels:,} and {self.max_pixels:,}")
        return found

    def fit(self, width: int, height: int, max_pixels: int | None, max_edge: int | None) -> str | None:
        """The largest size of the same aspect within the limits that obeys the rule, if there is one."""
        edge_cap = min(self.max_edge, max_edge or self.max_edge)
        pixel_cap = min(self.max_pixels, max_pixels or self.max_pixels)
        scale = min(1.0, edge_cap / max(width, height), math.sqrt(pixel_cap / (width * height)))
        step = self.multiple_of
        fitted_w = max(step, int(width * scale) // step * step)
        fitted_h = max(step, int(height * scale) // step * step)
        if fitted_w * fitted_h > pixel_cap or max(fitted_w, fitted_h) > edge_cap:
            return None
        return None if self.problems(fitted_w, fitted_h) else f"{fitted_w}x{fitted_h}"


def nearest(requested: object, candidates: Sequence[str]) -> str | None:
    """The candidate closest in aspect ratio, then in pixel count; the first one for `auto`/junk."""
    parsed = parse(requested)
    concrete = [c for c in candidates if parse(c)]
    if not concrete:
        return None
    if parsed is None:
        return concrete[0]
    width, height = parsed

    def distance(candidate: str) -> tuple[float, float]:
        cw, ch = parse(candidate) or (1, 1)
        return abs(math.log((cw / ch) / (width / height))), abs(math.log((cw * ch) / (width * height)))

    return min(concrete, key=distance)
