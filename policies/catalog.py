"""The model catalog: what each image model accepts, what it costs, and its lifecycle, as validated data.

Owns `ModelEntry` (one model), `Catalog` (the immutable name -> entry mapping) and `load_catalog`,
which reads the shipped `catalog.yaml` and merges the configuration file's `catalog:` section:

- an override of a shipped model is deep-merged into it: mappings merge key by key (so
  `prices: {image_out: 30}` changes one price and keeps the others), lists and scalars replace;
- a new model gives every field, or `extends: <model>` to start from a copy of another entry (as
  overridden) and replace whole fields; `lifecycle` is never copied, so a new model is available
  unless it says otherwise. Shipped entries use `extends` the same way, resolved before overrides,
  so overriding a shipped model never changes another one.

Every problem is reported at once, one `catalog.<model>.<field>: message` line each.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import date
from decimal import Decimal
from importlib import resources
from itertools import pairwise
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
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


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CatalogError(Exception):
    """A catalog that cannot be used; `errors` holds one `catalog.<model>.<field>: message` per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


class IntRange(_Frozen):
    min: int = Field(ge=0)
    max: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.min <= value <= self.max


class Prices(_Frozen):
    """USD per 1M tokens, per bucket. Cached prices are listed for reference (see policies.cost)."""

    text_in: Decimal = Field(ge=0)
    image_in: Decimal = Field(ge=0)
    image_out: Decimal = Field(ge=0)
    text_in_cached: Decimal | None = Field(default=None, ge=0)
    image_in_cached: Decimal | None = Field(default=None, ge=0)


class Lifecycle(_Frozen):
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


class ModelEntry(_Frozen):
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

    @property
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

    @model_validator(mode="after")
    def _consistent(self) -> ModelEntry:
        # a broken curve cannot be evaluated: report it instead of what pricing would make of it
        problems = [*self._default_problems(), *(_curve_problems(self) or self._pricing_problems())]
        if self.partial_images is not None and not self.stream:
            problems.append("partial_images: needs stream: true")
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


class ImplicitModel(_Frozen):
    """OpenAI's pick for a request without `model`: `default`, or `gpt_image` if it sends a GPT-only param."""

    default: str
    gpt_image: str


class Catalog(Mapping[str, ModelEntry]):
    """The immutable catalog: model name -> ModelEntry."""

    def __init__(self, entries: Mapping[str, ModelEntry], implicit: ImplicitModel) -> None:
        self._entries: Mapping[str, ModelEntry] = MappingProxyType(dict(entries))
        self.implicit = implicit

    def __getitem__(self, name: str) -> ModelEntry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def implicit_model(self, body: Mapping[str, Any]) -> str:
        """OpenAI's default model for a body without `model`."""
        default, gpt = self._entries[self.implicit.default], self._entries[self.implicit.gpt_image]
        gpt_only = gpt.accepted_params - default.accepted_params
        if any(body.get(param) is not None for param in gpt_only) or body.get("stream") is True:
            return self.implicit.gpt_image
        return self.implicit.default


def load_catalog(overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Catalog:
    """The shipped catalog merged with the configuration's `catalog:` section; raises CatalogError."""
    shipped = yaml.safe_load(resources.files("policies").joinpath("catalog.yaml").read_text("utf-8"))
    errors: list[str] = []
    resolved: dict[str, dict[str, Any]] = {}
    for name in shipped["models"]:
        _resolve(name, shipped["models"], resolved, errors, ())
    new = _apply_overrides(resolved, overrides or {}, errors)
    for name in new:
        _resolve(name, new, resolved, errors, ())
    entries = _validate(resolved, errors)
    implicit = ImplicitModel.model_validate(shipped["implicit_model"])
    _check_references(entries, set(resolved), implicit, errors)
    if errors:
        raise CatalogError(errors)
    return Catalog(entries, implicit)


def _resolve(
    name: str,
    raws: Mapping[str, Any],
    done: dict[str, dict[str, Any]],
    errors: list[str],
    chain: tuple[str, ...],
) -> dict[str, Any] | None:
    """The fields of `name` with `extends` applied (shallow: the child's fields replace whole fields)."""
    if name in done:
        return done[name]
    if name in chain:
        errors.append(f"catalog.{name}.extends: circular ({' -> '.join((*chain, name))})")
        return None
    raw = dict(raws[name])
    parent = raw.pop("extends", None)
    if parent is not None:
        if parent not in done and parent not in raws:
            errors.append(f"catalog.{name}.extends: unknown model {parent!r}")
            return None
        base = _resolve(parent, raws, done, errors, (*chain, name))
        if base is None:
            return None
        raw = {**{k: v for k, v in base.items() if k != "lifecycle"}, **raw}
    done[name] = raw
    return raw


def _apply_overrides(
    resolved: dict[str, dict[str, Any]], overrides: Mapping[str, Any], errors: list[str]
) -> dict[str, dict[str, Any]]:
    """Deep-merge overrides of shipped models into `resolved`; return the new models, unresolved."""
    new: dict[str, dict[str, Any]] = {}
    for name, override in overrides.items():
        if not isinstance(override, Mapping):
            errors.append(f"catalog.{name}: must be a mapping of fields, got {type(override).__name__}")
        elif "name" in override:
            errors.append(f"catalog.{name}.name: the key under catalog: is the name; remove this field")
        elif name not in resolved:
            new[name] = dict(override)
        elif "extends" in override:
            errors.append(f"catalog.{name}.extends: only a new model may extend another; override fields")
        else:
            resolved[name] = _deep_merge(resolved[name], override)
    return new


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        both = isinstance(value, Mapping) and isinstance(current, Mapping)
        merged[key] = _deep_merge(current, value) if both else value  # type: ignore[arg-type]
    return merged


def _validate(raws: Mapping[str, dict[str, Any]], errors: list[str]) -> dict[str, ModelEntry]:
    entries = {}
    for name, raw in raws.items():
        try:
            entries[name] = ModelEntry.model_validate({**raw, "name": name})
        except ValidationError as exc:
            errors.extend(_lines(name, exc))
    return entries


def _lines(name: str, exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"])
        for message in error["msg"].removeprefix("Value error, ").split("\n"):
            lines.append(f"catalog.{name}.{path}: {message}" if path else f"catalog.{name}.{message}")
    return lines


def _check_references(
    entries: Mapping[str, ModelEntry], names: set[str], implicit: ImplicitModel, errors: list[str]
) -> None:
    """References between entries; `names` includes entries that failed validation (already reported)."""
    for name, entry in entries.items():
        replacement = entry.lifecycle.replacement
        if replacement is not None and replacement not in names:
            errors.append(f"catalog.{name}.lifecycle.replacement: unknown model {replacement!r}")
    for which, name in implicit:
        if name not in names:
            errors.append(f"catalog.implicit_model.{which}: unknown model {name!r}")
