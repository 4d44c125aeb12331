"""What a request costs: the estimate reserved before the call, and the actual cost from `usage`.

Money is integer nano-USD (1e-9 USD) so that sums never drift through float rounding: a price of
$32 per 1M tokens is exactly 32,000 nano-USD per token. A price finer than that is rounded up, once
per bucket, by the same function for the estimate and the actual cost, so when the upstream reports
exactly the estimated tokens the two are equal to the nano-USD.

The estimate is a conservative upper bound, never below what the token table (or an upstream that
reports usage from it, like the mock) gives for the same request:
- input text tokens: the prompt's UTF-8 byte length (at least 1). Byte-level BPE never makes more
  tokens than bytes, so no tokenizer is needed.
- input image tokens (edits): every uploaded image and the mask, by the catalog's
  `input_image_tokens` rule from the dimensions in their headers, plus the high-fidelity extra
  (`policies.uploads.input_tokens`), times n (with n > 1 the inputs may be billed once per
  image); generations send no input image.
- output tokens: the larger of the token table and the catalog's monotone token curve (gpt-image-2,
  whose table has gaps) at the size and quality, times n, plus `partial_image_tokens` for each
  partial image when streaming.
- `auto` or omitted quality and size: the worst case over everything the upstream may resolve it
  to, which is every concrete quality and every fixed size of the model (`auto` picks among the
  standard sizes), whatever the policy: the upstream is not bound by the policy. An enforced policy
  that narrows qualities or sizes has already pinned `auto` to its costliest allowed value
  (`policies.tenant`), so the estimate of such a request is exact. `auto` still reaches the estimate
  only where nothing narrows it: a policy that allows every value (or none), and shadow mode.
- per-image priced models (dall-e) reserve n times the price of the size and quality.
Cached-input prices are catalogued but never applied: image `usage` does not split cached tokens by
bucket, so settling at the uncached price is the safe upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from policies import sizes
from policies.capabilities import is_int
from policies.catalog import AUTO, ModelEntry
from policies.uploads import GENERATE, Inputs, input_tokens
from policies.values import value_type

NANO_PER_USD = 1_000_000_000


@value_type
class Cost:
    """Images, tokens per price bucket, and USD, for one request (estimated or actual)."""

    images: int = 0
    text_in_tokens: int = 0
    image_in_tokens: int = 0
    image_out_tokens: int = 0  # every output token, priced as image output
    nano_usd: int = 0

    @property
    def tokens(self) -> int:
        return self.text_in_tokens + self.image_in_tokens + self.image_out_tokens

    @property
    def usd(self) -> float:
        return self.nano_usd / NANO_PER_USD


def estimate(body: Mapping[str, Any], entry: ModelEntry, inputs: Inputs = GENERATE) -> Cost:
    """The most this request can cost (body = Decision.body, as forwarded); tolerant of any body.

    No policy is consulted: the policy acts on the body (pinning `auto`), never on what the
    upstream may make of it.
    """
    n = _images(body.get("n"), entry)
    if entry.per_image:
        return _per_image(body, entry, n)
    per_image = entry.worst_output_tokens(
        _sizes(body.get("size"), entry), _qualities(body.get("quality"), entry)
    )
    partial = _partial_images(body, entry) * entry.partial_image_tokens
    fidelity = entry.effective(body, "input_fidelity", inputs.operation)
    # n > 1 may bill the inputs once per image (measured on gpt-image-2): reserve them n times
    image_in = input_tokens(entry, inputs, fidelity) * n
    return priced(entry, n, prompt_tokens(body.get("prompt")), image_in, (per_image + partial) * n)


def actual_cost(
    body: Mapping[str, Any], usage: dict[str, Any] | None, images: int, entry: ModelEntry
) -> Cost | None:
    """The cost the upstream reported; None when a per-token model reported no usable usage."""
    if entry.per_image:
        return _per_image(body, entry, max(0, images))
    tokens = _usage_tokens(usage, body)
    return None if tokens is None else priced(entry, max(0, images), *tokens)


def priced(entry: ModelEntry, images: int, text_in: int, image_in: int, image_out: int) -> Cost:
    """A Cost of per-token model `entry` with its USD, each bucket rounded up to the nano-USD."""
    nano = sum(_token_nanos(entry, text_in, image_in, image_out)) if entry.prices is not None else 0
    return Cost(images, text_in, image_in, image_out, nano)


def nano_usd_by_bucket(cost: Cost, entry: ModelEntry) -> dict[str, int]:
    """USD per price bucket in nano-USD: text_in, image_in, image_out; or per_image (dall-e)."""
    if entry.prices is None:
        return {"per_image": cost.nano_usd}
    nanos = _token_nanos(entry, cost.text_in_tokens, cost.image_in_tokens, cost.image_out_tokens)
    return dict(zip(("text_in", "image_in", "image_out"), nanos, strict=True))


def prompt_tokens(prompt: object) -> int:
    """An upper bound of the prompt's text tokens: its UTF-8 byte length, at least 1."""
    text = prompt if isinstance(prompt, str) else ""
    return max(1, len(text.encode("utf-8", "surrogatepass")))


def _token_nanos(entry: ModelEntry, text_in: int, image_in: int, image_out: int) -> tuple[int, int, int]:
    """Nano-USD of each bucket's tokens, each rounded up."""
    assert entry.prices is not None
    text_rate, image_in_rate, image_out_rate = entry.prices.nano_usd_per_token
    return _nano(text_in, text_rate), _nano(image_in, image_in_rate), _nano(image_out, image_out_rate)


def _nano(tokens: int, rate: int | Decimal) -> int:
    return tokens * rate if isinstance(rate, int) else math.ceil(tokens * rate)


def _per_image(body: Mapping[str, Any], entry: ModelEntry, images: int) -> Cost:
    price = max(
        (
            entry.image_price(size, quality) or Decimal(0)
            for size in _sizes(body.get("size"), entry)
            for quality in _qualities(body.get("quality"), entry)
        ),
        default=Decimal(0),
    )
    return Cost(images=images, nano_usd=math.ceil(price * NANO_PER_USD) * images)


def _images(n: object, entry: ModelEntry) -> int:
    if n is None:
        return 1
    return n if is_int(n) and n in entry.n else entry.n.max


def _partial_images(body: Mapping[str, Any], entry: ModelEntry) -> int:
    value, span = body.get("partial_images"), entry.partial_images
    if body.get("stream") is not True or span is None or value is None:
        return 0
    return value if is_int(value) and value in span else span.max


def _sizes(value: object, entry: ModelEntry) -> list[str]:
    """The sizes `value` may produce: itself when concrete, every fixed size for `auto`, else the worst."""
    size = entry.default_size if value is None else value
    dims = sizes.parse(size)
    rule = entry.arbitrary_sizes
    if isinstance(size, str) and dims and (size in entry.sizes or (rule and not rule.problems(*dims))):
        return [size]
    fixed = entry.fixed_sizes
    if size == AUTO:
        return fixed
    largest = [f"{rule.max_edge}x{-(-rule.max_pixels // rule.max_edge)}"] if rule else []
    return fixed + largest  # not a size the model takes: the worst case


def _qualities(value: object, entry: ModelEntry) -> list[str]:
    """The qualities `value` may produce: itself when concrete, else (`auto`, junk) every one."""
    quality = entry.default_quality if value is None else value
    if isinstance(quality, str) and quality != AUTO and quality in entry.qualities:
        return [quality]
    return entry.concrete_qualities


# No image request comes near a billion tokens: a count above it is a broken upstream, not usage.
# Bounding it keeps every amount the store adds far inside exact integer range (Lua's doubles).
MAX_REPORTED_TOKENS = 10**9


def _count(value: object) -> int | None:
    return value if is_int(value) and 0 <= value <= MAX_REPORTED_TOKENS else None


def _usage_tokens(usage: object, body: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """(text_in, image_in, output) from a parsed `usage` object (a JSON object is a dict), tolerating
    missing details; None if unusable."""
    if not isinstance(usage, dict):  # not Mapping: an ABC's isinstance costs ten times more
        return None
    details = usage.get("input_tokens_details")
    details = details if isinstance(details, dict) else {}
    given, output = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
    total = _count(usage.get("total_tokens"))
    text, image = _count(details.get("text_tokens")), _count(details.get("image_tokens"))
    if given is None and (text is not None or image is not None):
        given = (text or 0) + (image or 0)
    if output is None and total is not None and given is not None:
        output = max(0, total - given)
    if output is None:
        return None
    if given is None and total is not None:
        given = max(0, total - output)
    image_in = image or 0
    if text is None:
        text = max(0, given - image_in) if given is not None else prompt_tokens(body.get("prompt"))
    return text, image_in, output
