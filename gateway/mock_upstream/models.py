"""What the mock knows about models: the ids each flavor serves, the output-token table, `usage`.

The token figures are FACTS.md section 2. gpt-image-2 has only a few calculator readings; other
sizes interpolate linearly by pixel count between them, so no value exceeds the readings around it.
`usage` is a whole request's (a JSON body); `image_usages` splits it into one `usage` per image, as
a stream reports it on each image's completed event: each image its own output tokens (partials
included), the prompt's text tokens on the first image only, so the stream's usages add up to the
whole request's, count by count.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

from gateway.mock_upstream.options import Flavor

Family = Literal["gpt-image-1", "gpt-image-2"]  # which size rules and token table apply

MODELS: dict[Flavor, dict[str, Family]] = {
    "openai": {
        "gpt-image-1-mini": "gpt-image-1",
        "gpt-image-1.5": "gpt-image-1",
        "gpt-image-2": "gpt-image-2",
        "gpt-image-2-2026-04-21": "gpt-image-2",
        "chatgpt-image-latest": "gpt-image-1",
    },
    "digitalocean": {
        "openai-gpt-image-1": "gpt-image-1",
        "openai-gpt-image-1.5": "gpt-image-1",
    },
}
RETIRED = frozenset({"dall-e-2", "dall-e-3", "gpt-image-1"})  # OpenAI answers 404 model_not_found
QUALITIES = ("low", "medium", "high")
PARTIAL_IMAGE_TOKENS = 100

# Output image tokens per image, (low, medium, high), for gpt-image-1 / -1-mini / -1.5.
_GPT_IMAGE_1: dict[tuple[int, int], tuple[int, int, int]] = {
    (1024, 1024): (272, 1056, 4160),
    (1024, 1536): (408, 1584, 6240),
    (1536, 1024): (400, 1568, 6208),
}
# gpt-image-2 high-quality readings as (pixels, tokens); low and medium are shares of high:
# low from the one low reading (196 of 7024 at 1024x1024), medium at gpt-image-1's share (1056/4160).
_GPT_IMAGE_2_HIGH = ((1024 * 1024, 7024), (1536 * 1024, 5488), (3840 * 2160, 13342))
_GPT_IMAGE_2_SHARE = {"low": (196, 7024), "medium": (1056, 4160), "high": (1, 1)}


def image_tokens(family: Family, width: int, height: int, quality: str) -> int:
    """Output tokens for one final image; `quality` is already resolved (never `auto`)."""
    if family == "gpt-image-1":
        return _GPT_IMAGE_1[(width, height)][QUALITIES.index(quality)]
    num, den = _GPT_IMAGE_2_SHARE[quality]
    return _gpt_image_2_high(width * height) * num // den


def _gpt_image_2_high(pixels: int) -> int:
    first_px, first_tokens = _GPT_IMAGE_2_HIGH[0]
    if pixels <= first_px:  # below the smallest reading: proportional to pixels
        return first_tokens * pixels // first_px
    for (lo_px, lo_t), (hi_px, hi_t) in itertools.pairwise(_GPT_IMAGE_2_HIGH):
        if pixels <= hi_px:
            return lo_t + (hi_t - lo_t) * (pixels - lo_px) // (hi_px - lo_px)
    return _GPT_IMAGE_2_HIGH[-1][1]


def text_tokens(prompt: str) -> int:
    """About four characters a token, at least one; never more than the prompt's UTF-8 bytes."""
    return max(1, -(-len(prompt) // 4))


def input_image_tokens(family: Family, width: int, height: int) -> int:
    """Input tokens of one image sent to an edit: gpt-image-1's 512px tiles (the shorter side
    scaled to 512 after fitting 2048x2048; 65 + 129 per tile), gpt-image-2's 32px patches (magnified
    up to 2x towards a 1024px longest side, at most 1536)."""
    if family == "gpt-image-1":
        fit = min(1.0, 2048 / max(width, height))
        w, h = width * fit, height * fit
        short = min(1.0, 512 / min(w, h))
        tiles = -(-int(w * short) // 512) * -(-int(h * short) // 512)
        return 65 + 129 * tiles
    magnify = min(2.0, max(1.0, 1024 / max(width, height)))
    patches = -(-int(width * magnify) // 32) * -(-int(height * magnify) // 32)
    return min(patches, 1536)


HIGH_FIDELITY_TOKENS = {True: 4160, False: 6240}  # by whether the first image is square (gpt-image-1)


def usage(
    family: Family,
    width: int,
    height: int,
    quality: str,
    *,
    n: int,
    prompt: str,
    partial_images: int,
    image_in: int = 0,
) -> dict[str, Any]:
    """The `usage` object for a whole request; `partial_images` counts per image (0 unless streaming);
    `image_in` the input image tokens of an edit."""
    per_image = image_tokens(family, width, height, quality) + PARTIAL_IMAGE_TOKENS * partial_images
    output = per_image * n
    return _usage(text_tokens(prompt), image_in, output)


def _usage(text: int, image_in: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": text + image_in,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image_in},
        "output_tokens": output,
        "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
        "total_tokens": text + image_in + output,
    }


def image_usages(
    family: Family,
    width: int,
    height: int,
    quality: str,
    *,
    n: int,
    prompt: str,
    partial_images: int,
    image_in: int = 0,
) -> list[dict[str, Any]]:
    """One `usage` per image of a streamed request; their sum is `usage(...)` for the same request
    (the inputs, text and images, on the first image's)."""
    output = image_tokens(family, width, height, quality) + PARTIAL_IMAGE_TOKENS * partial_images
    text = text_tokens(prompt)
    return [_usage(text, image_in, output) if image == 0 else _usage(0, 0, output) for image in range(n)]
