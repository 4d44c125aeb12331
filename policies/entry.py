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
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

from policies import sizes
from policies.frozen import Frozen
from policies.sizes import SizeRule

AUTO = "auto"
# OpenAI's defaults for an omitted parameter that the catalog gives no model-specific default for
_MEMO_CAP = 1024  # sizes and qualities remembered per model
_NANO_PER_TOKEN = 1000  # nano-USD (1e-9 USD) per token at $1 per 1M tokens

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

    @cached_property
    def nano_usd_per_token(self) -> tuple[int | Decimal, int | Decimal, int | Decimal]:
        """text_in, image_in and image_out in nano-USD per token ($1 per 1M tokens is 1000): an int
        where the price has no digit finer than that (every shipped price), so a cost is integer
        arithmetic, not three Decimal products per request."""
        return _per_token(self.text_in), _per_token(self.image_in), _per_token(self.image_out)


_K = TypeVar("_K")
_V = TypeVar("_V")


def _kept(memo: dict[_K, _V], key: _K, value: _V) -> _V:
    """`value`, remembered under `key` unless the memo is full (gpt-image-2 takes any size: each
    model's memos stay bounded)."""
    if len(memo) < _MEMO_CAP:
        memo[key] = value
    return value


def _per_token(usd_per_million: Decimal) -> int | Decimal:
    nano = usd_per_million * _NANO_PER_TOKEN
    return int(nano) if nano == nano.to_integral_value() else nano


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


Operation = Literal["generate", "edit", "variation"]
OPERATIONS: tuple[Operation, ...] = ("generate", "edit", "variation")


class UploadRule(Frozen):
    """What an edit or a variation takes as input files (OpenAI's API reference, images/createEdit
    and images/createVariation; sources in catalog.yaml)."""

    max_images: int = Field(ge=1)
    formats: list[Literal["png", "jpeg", "webp"]] = Field(min_length=1)
    max_bytes: int = Field(gt=0)  # each image file
    square: bool = False  # dall-e-2: square images only
    mask: bool = False  # whether a mask may be sent (always a png the size of the first image)
    mask_max_bytes: int = Field(default=4 * 2**20, gt=0)  # the SDK's `mask`: "less than 4MB"


class InputImageTokens(Frozen):
    """How one input image is tokenised (catalog.yaml gives the sources and the two methods).

    `tiles` (gpt-image-1 family): fit within `fit` x `fit`, scale the shorter side down to
    `short_side`, count `tile`-pixel tiles: `base + per_tile * tiles`. `input_fidelity: high` adds
    `high_fidelity_square` (square image) or `high_fidelity_other` tokens to each of the first
    `high_fidelity_images` images.
    `patches` (gpt-image-2): magnify up to `max_magnify` times towards a longest side of
    `magnify_to`, then count `patch`-pixel patches, at most `budget` (a larger image is scaled down).
    """

    method: Literal["tiles", "patches"]
    fit: int = Field(default=2048, gt=0)
    short_side: int = Field(default=512, gt=0)
    tile: int = Field(default=512, gt=0)
    base: int = Field(default=65, ge=0)
    per_tile: int = Field(default=129, ge=0)
    high_fidelity_square: int = Field(default=0, ge=0)
    high_fidelity_other: int = Field(default=0, ge=0)
    high_fidelity_images: int = Field(default=1, ge=0)
    patch: int = Field(default=32, gt=0)
    budget: int = Field(default=1536, gt=0)
    magnify_to: int = Field(default=1024, gt=0)
    max_magnify: int = Field(default=2, ge=1)


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
    default_response_format: str | None = None  # dall-e: `url` ("Defaults to url")
    styles: list[str] | None = None
    user_max_chars: int = Field(default=256, ge=1)
    edits: UploadRule | None = None  # None: no edits endpoint for this model
    variations: UploadRule | None = None  # None: no variations endpoint for this model
    input_fidelities: list[str] | None = None  # edits only; None: `input_fidelity` not accepted
    input_image_tokens: InputImageTokens | None = None  # None: input images are not billed by token
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

    @cached_property
    def fixed_sizes(self) -> list[str]:
        """The sizes that are `WxH` (not `auto`), in the catalog's order; one list, not to be changed."""
        return [s for s in self.sizes if sizes.parse(s)]

    @cached_property
    def concrete_qualities(self) -> list[str]:
        """The qualities other than `auto`, cheapest first; one list, not to be changed."""
        return [q for q in self.qualities if q != AUTO]

    @cached_property
    def operations(self) -> tuple[Operation, ...]:
        """What the model does: every model generates; edits and variations where the catalog says."""
        rules = {"generate": True, "edit": self.edits is not None, "variation": self.variations is not None}
        return tuple(op for op in OPERATIONS if rules[op])

    def upload_rule(self, operation: Operation) -> UploadRule | None:
        return self.edits if operation == "edit" else self.variations if operation == "variation" else None

    def params(self, operation: Operation = "generate") -> frozenset[str]:
        """The body fields `operation` takes with this model (files excluded): an edit takes what a
        generation does except `moderation` and `style`, plus `input_fidelity`; a variation only
        `model`, `n`, `size`, `response_format` and `user` (not `safety_identifier`)."""
        if operation == "generate":
            return self.accepted_params
        if operation == "variation":
            return frozenset({"model", "n", "size", "user"} | ({"response_format"} & self.accepted_params))
        fidelity = {"input_fidelity"} if self.input_fidelities is not None else set()
        return (self.accepted_params - {"moderation", "style"}) | fidelity

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
        fixed = {"prompt", "model", "n", "size", "quality", "user", "safety_identifier", "stream"}
        return frozenset({*fixed, *given})

    def effective(self, body: Mapping[str, Any], param: str, operation: Operation = "generate") -> Any:
        """The value the upstream will use: the body's unless null or absent, else the model's default
        (None for a parameter `operation` does not take)."""
        value = body.get(param)
        if value is not None:
            return value
        return self._defaults[operation].get(param)

    @cached_property
    def _defaults(self) -> Mapping[Operation, Mapping[str, Any]]:
        """What the upstream uses for an omitted parameter that `operation` takes: the model's own
        defaults, else the API's. Per operation, so that `effective` asks one dict, not `params`."""
        defaults = {
            **_API_DEFAULTS,
            "size": self.default_size,
            "quality": self.default_quality,
            "output_format": self.default_output_format,
            "response_format": self.default_response_format,
            "input_fidelity": "low",  # OpenAI's default for the models that take it
        }
        return {op: {p: v for p, v in defaults.items() if p in self.params(op)} for op in OPERATIONS}

    def output_tokens(self, size: str, quality: str) -> int | None:
        """Output tokens of one image at a concrete size and quality: the larger of table and curve."""
        memo, key = self._output_tokens_memo, (size, quality)
        return memo[key] if key in memo else _kept(memo, key, self._output_tokens(size, quality))

    @cached_property
    def _output_tokens_memo(self) -> dict[tuple[str, str], int | None]:
        return {}

    def worst_output_tokens(self, size_options: list[str], quality_options: list[str]) -> int:
        """The most output tokens one image takes over every pairing of the sizes and qualities
        given (0 if none, or none has a figure): an `auto` request's nine pairings looked up once."""
        memo, key = self._worst_output_tokens_memo, (tuple(size_options), tuple(quality_options))
        if key in memo:
            return memo[key]
        tokens = max(
            (self.output_tokens(s, q) or 0 for s in size_options for q in quality_options), default=0
        )
        return _kept(memo, key, tokens)

    @cached_property
    def _worst_output_tokens_memo(self) -> dict[tuple[tuple[str, ...], tuple[str, ...]], int]:
        return {}

    def _output_tokens(self, size: str, quality: str) -> int | None:
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
        if self.response_formats is not None and self.default_response_format not in self.response_formats:
            problems.append(
                f"default_response_format: {self.default_response_format!r} is not one of response_formats"
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
