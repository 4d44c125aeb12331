"""One model of the catalog: `ModelEntry`, the validated description of what it takes and costs.

Owns the shape of a catalog entry (see the field reference at the top of catalog.yaml), its
consistency rules (defaults among the listed values, a price and a token count for every size and
quality, token curves that are monotone upper bounds never below the table) and the questions asked
of one model: which parameters it accepts, the value it uses for an omitted one, how many output
tokens an image costs, the price of an image. Loading and merging entries is `policies.catalog`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from decimal import Decimal
from functools import cached_property
from itertools import pairwise
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

from policies import sizes
from policies.sizes import SizeRule

AUTO = "auto"
# OpenAI's defaults for an omitted parameter that the catalog gives no model-specific default for
_API_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "n": 1,
        "background": AUTO,
        "moderation": AUTO,
        "stream": False,
        "partial_images": 0,
        "output_compression": 100,
    }
)


# [[pixels, tokens], ...] of a monotone upper envelope (see catalog.yaml)
_Curve = Annotated[list[tuple[PositiveInt, NonNegativeInt]], Field(min_length=1)]


class Frozen(BaseModel):
    """Immutable, and unknown keys are errors (a typo in the catalog fails loudly)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class IntRange(Frozen):
    min: int = Field(ge=0)
    max: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.min <= value <= self.max


class Prices(Frozen):
    """USD per 1M tokens, per bucket. Cached prices are listed for reference (see policies.cost)."""

    text_in: Decimal = Field(ge=0)
    image_in: Decimal = Field(ge=0)
    image_out: Decimal = Field(ge=0)
    text_in_cached: Decimal | None = Field(default=None, ge=0)
    image_in_cached: Decimal | None = Field(default=None, ge=0)


class Lifecycle(Frozen):
    status: Literal["available", "retired"] = "available"
    retired_on: date | None = None
    replacement: str | None = None
    on_retired: Literal["alias", "reject"] = "alias"
    # param -> {value sent to the retired model: value for the replacement, or None to drop the param}
    translate: dict[str, dict[str, str | None]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _alias_has_target(self) -> Lifecycle:
        if self.status == "retired" and self.on_retired == "alias" and not self.replacement:
            raise ValueError("on_retired: alias needs a replacement")
        return self


class ModelEntry(Frozen):
    """Everything the gateway knows about one model; `None` means the model does not take the parameter."""

    name: str
    prompt_max_chars: int = Field(ge=1)
    n: IntRange
    sizes: list[str] = Field(min_length=1)
    default_size: str
    arbitrary_sizes: SizeRule | None = None
    qualities: list[str] = Field(min_length=1)  # cheapest first; `auto` anywhere
    default_quality: str
    backgrounds: list[str] | None = None
    moderation: list[str] | None = None
    output_formats: list[str] | None = None
    default_output_format: str | None = None
    transparent_formats: list[str] = Field(default_factory=list)
    compression_formats: list[str] = Field(default_factory=list)
    output_compression: IntRange | None = None
    stream: bool = False
    partial_images: IntRange | None = None
    response_formats: list[str] | None = None
    styles: list[str] | None = None
    user_max_chars: int = Field(default=256, ge=1)
    token_table: dict[str, dict[str, NonNegativeInt]] | None = None
    token_curve: dict[str, _Curve] | None = None
    partial_image_tokens: int = Field(default=0, ge=0)
    prices: Prices | None = None
    image_prices: dict[str, dict[str, Annotated[Decimal, Field(ge=0)]]] | None = None
    lifecycle: Lifecycle = Lifecycle()
    # upstream flavor -> fields that differ when this model is served there (DigitalOcean's n and
    # sizes): checked before sending, like the model's own
    flavors: dict[Literal["openai", "digitalocean"], dict[str, Any]] = Field(default_factory=dict)

    def on(self, flavor: str) -> ModelEntry:
        """This model as `flavor`'s upstream serves it: the entry with that flavor's overlay applied."""
        return self._flavored.get(flavor, self)

    @cached_property
    def _flavored(self) -> dict[str, ModelEntry]:
        base = self.model_dump(exclude={"flavors"})
        return {
            flavor: ModelEntry.model_validate({**base, **overlay}) for flavor, overlay in self.flavors.items()
        }

    @property
    def retired(self) -> bool:
        return self.lifecycle.status == "retired"

    @property
    def per_image(self) -> bool:
        """Priced per image (dall-e), not per token."""
        return self.image_prices is not None

    @property
    def fixed_sizes(self) -> list[str]:
        return [s for s in self.sizes if sizes.parse(s)]

    @property
    def concrete_qualities(self) -> list[str]:
        return [q for q in self.qualities if q != AUTO]

    @cached_property
    def accepted_params(self) -> frozenset[str]:
        optional = {
            "background": self.backgrounds,
            "moderation": self.moderation,
            "output_format": self.output_formats,
            "output_compression": self.output_compression,
            "partial_images": self.partial_images,
            "response_format": self.response_formats,
            "style": self.styles,
        }
        given = {param for param, spec in optional.items() if spec is not None}
        return frozenset({"prompt", "model", "n", "size", "quality", "user", "stream", *given})

    def effective(self, body: Mapping[str, Any], param: str) -> Any:
        """The value the upstream will use: the body's unless null or absent, else the model's default."""
        value = body.get(param)
        if value is not None or param not in self.accepted_params:
            return value
        own = {
            "size": self.default_size,
            "quality": self.default_quality,
            "output_format": self.default_output_format,
        }
        return own[param] if param in own else _API_DEFAULTS.get(param)

    def output_tokens(self, size: str, quality: str) -> int | None:
        """Output tokens of one image at a concrete size and quality: the larger of table and curve."""
        readings = []
        if self.token_table and quality in self.token_table.get(size, {}):
            readings.append(self.token_table[size][quality])
        px = sizes.pixels(size)
        if self.token_curve and quality in self.token_curve and px is not None:
            readings.append(_curve_at(self.token_curve[quality], px))
        return max(readings) if readings else None

    def image_price(self, size: str, quality: str) -> Decimal | None:
        return (self.image_prices or {}).get(size, {}).get(quality)

    def image_cost(self, size: str, quality: str) -> Decimal:
        """What one image costs in the model's own unit (USD per image, or output tokens: one price
        per token), to rank sizes and qualities of this model; 0 when the catalog has no figure."""
        if self.per_image:
            return self.image_price(size, quality) or Decimal(0)
        return Decimal(self.output_tokens(size, quality) or 0)

    def worst_image_cost(self, size_options: list[str], quality_options: list[str]) -> Decimal:
        """The largest `image_cost` over every pairing of the sizes and qualities given (0 if none)."""
        return max((self.image_cost(s, q) for s in size_options for q in quality_options), default=Decimal(0))

    @model_validator(mode="after")
    def _consistent(self) -> ModelEntry:
        # a broken curve cannot be evaluated: report it instead of what pricing would make of it
        problems = [*self._default_problems(), *(_curve_problems(self) or self._pricing_problems())]
        if self.partial_images is not None and not self.stream:
            problems.append("partial_images: needs stream: true")
        for flavor, overlay in self.flavors.items():
            try:
                ModelEntry.model_validate({**self.model_dump(exclude={"flavors"}), **overlay})
            except ValidationError as exc:
                problems += [
                    f"flavors.{flavor}.{'.'.join(map(str, e['loc']))}: {e['msg']}".replace(".: ", ": ")
                    for e in exc.errors()
                ]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _default_problems(self) -> list[str]:
        problems = []
        if self.default_size not in self.sizes:
            problems.append(f"default_size: {self.default_size!r} is not one of sizes")
        if self.default_quality not in self.qualities:
            problems.append(f"default_quality: {self.default_quality!r} is not one of qualities")
        if self.output_formats is not None and self.default_output_format not in self.output_formats:
            problems.append(
                f"default_output_format: {self.default_output_format!r} is not one of output_formats"
            )
        for size in self.sizes:
            if size != AUTO and not sizes.parse(size):
                problems.append(f"sizes: {size!r} is neither auto nor WIDTHxHEIGHT")
        return problems

    def _pricing_problems(self) -> list[str]:
        if (self.prices is None) == (self.image_prices is None):
            return ["prices: give exactly one of prices (per 1M tokens) and image_prices (per image)"]
        if self.per_image:
            return [
                f"image_prices: no price for {size} {quality}"
                for size in self.fixed_sizes
                for quality in self.concrete_qualities
                if self.image_price(size, quality) is None
            ]
        problems = [
            f"token_table: no output tokens for {size} {quality}"
            for size in self.fixed_sizes
            for quality in self.concrete_qualities
            if self.output_tokens(size, quality) is None
        ]
        if self.arbitrary_sizes is not None:
            curve = self.token_curve or {}
            problems += [
                f"token_curve: arbitrary sizes need a curve for quality {quality!r}"
                for quality in self.concrete_qualities
                if quality not in curve
            ]
        return problems


def _curve_at(points: list[tuple[int, int]], px: int) -> int:
    """Tokens at `px` pixels: flat below the first point, linear between points (rounded up),
    proportional to the pixel count above the last."""
    first_px, first_tokens = points[0]
    if px <= first_px:
        return first_tokens
    for (p0, t0), (p1, t1) in pairwise(points):
        if px <= p1:
            return t0 + -(-(t1 - t0) * (px - p0) // (p1 - p0))
    last_px, last_tokens = points[-1]
    return -(-last_tokens * px // last_px)


def _curve_problems(entry: ModelEntry) -> list[str]:
    problems = []
    for quality, points in (entry.token_curve or {}).items():
        where = f"token_curve.{quality}"
        if any(p0 >= p1 or t0 > t1 for (p0, t0), (p1, t1) in pairwise(points)):
            problems.append(f"{where}: points must rise in pixels and never fall in tokens (an upper bound)")
            continue
        for size, row in (entry.token_table or {}).items():
            px = sizes.pixels(size)
            if quality in row and px is not None and _curve_at(points, px) < row[quality]:
                problems.append(f"{where}: below the token_table reading for {size} ({row[quality]})")
    return problems
