"""Tenant policy models: what a tenant may ask of a model, and what happens when it asks for more.

Owns the `Policy` shape (the `policies:` section of the configuration, see DESIGN.md). Checking a
request against it is `policies.tenant`; the meaning of each field is documented there.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from policies import prompts
from policies.frozen import Frozen

ClampableRule = Literal["n", "quality", "partial_images", "size"]
_WXH = re.compile(r"[1-9][0-9]*x[1-9][0-9]*")


class CompressionRange(Frozen):
    min: int = Field(default=0, ge=0, le=100)
    max: int = Field(default=100, ge=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> CompressionRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class Policy(Frozen):
    """One named policy from the `policies:` section. `None` means "no rule of the policy's own"."""

    mode: Literal["enforce", "shadow"] = "enforce"
    models: list[str] | None = None
    default_model: str | None = None
    sizes: list[str] | None = None
    max_pixels: int | None = Field(default=None, gt=0)
    max_edge: int | None = Field(default=None, gt=0)
    qualities: list[str] | None = None
    max_n: int | None = Field(default=None, ge=1)
    moderation: list[str] | None = None
    output_formats: list[str] | None = None
    backgrounds: list[str] | None = None
    output_compression: CompressionRange | None = None
    stream: bool = True
    max_partial_images: int | None = Field(default=None, ge=0)
    max_prompt_chars: int | None = Field(default=None, ge=1)
    require_user: bool = False
    deny_prompt_patterns: list[str] = Field(default_factory=list)
    operations: list[Literal["generate", "edit", "variation"]] | None = None
    max_input_images: int | None = Field(default=None, ge=1)
    input_fidelities: list[str] | None = None
    allow_mask: bool = True
    on_violation: dict[ClampableRule, Literal["reject", "clamp"]] = Field(default_factory=dict)

    @field_validator("sizes")
    @classmethod
    def _sizes_are_sizes(cls, values: list[str] | None) -> list[str] | None:
        for size in values or []:
            if size != "auto" and not _WXH.fullmatch(size):
                raise ValueError(f"{size!r} is neither auto nor WIDTHxHEIGHT")
        return values

    @field_validator("deny_prompt_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for index, pattern in enumerate(patterns):
            try:
                prompts.check(pattern)
            except ValueError as exc:
                raise ValueError(f"pattern #{index} '{pattern}': {exc}") from None
        return patterns

    @cached_property
    def deny(self) -> prompts.DenyPatterns:
        """The deny patterns, compiled once per policy."""
        return prompts.DenyPatterns(self.deny_prompt_patterns)

    @cached_property
    def set_fields(self) -> frozenset[str]:
        """The fields that differ from their defaults: a field at its default sets no rule."""
        return frozenset(
            name
            for name, info in type(self).model_fields.items()
            if getattr(self, name) != info.get_default(call_default_factory=True)
        )

    @property
    def narrows_sizes(self) -> bool:
        """Whether the policy has any rule on sizes (a list, or caps): without one every size passes."""
        return self.sizes is not None or self.max_pixels is not None or self.max_edge is not None

    def clamps(self, param: str) -> bool:
        """Whether a violation of the rule on `param` is clamped rather than rejected."""
        return any(rule == param and action == "clamp" for rule, action in self.on_violation.items())

    def with_overrides(self, overrides: dict[str, Any]) -> Policy:
        """This policy with single fields replaced (a tenant's `policy_overrides`), validated."""
        return Policy.model_validate({**self.model_dump(), **overrides})
