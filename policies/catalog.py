"""The model catalog: what each image model accepts, what it costs, and its lifecycle, as validated data.

Owns `Catalog` (the immutable name -> ModelEntry mapping; `ModelEntry` itself lives in
`policies.entry` and is re-exported here) and `load_catalog`, which reads the shipped
`catalog.yaml` and merges the configuration file's `catalog:` section:

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
from importlib import resources
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import ValidationError

from policies.entry import AUTO, IntRange, Lifecycle, ModelEntry, Operation, Prices
from policies.frozen import Frozen

__all__ = [
    "AUTO",
    "Catalog",
    "CatalogError",
    "ImplicitModel",
    "IntRange",
    "Lifecycle",
    "ModelEntry",
    "Prices",
    "load_catalog",
]


class CatalogError(Exception):
    """A catalog that cannot be used; `errors` holds one `catalog.<model>.<field>: message` per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


class ImplicitModel(Frozen):
    """OpenAI's pick for a request without `model`: `default`, or `gpt_image` if it sends a GPT-only param."""

    default: str
    gpt_image: str


class Catalog(Mapping[str, ModelEntry]):
    """The immutable catalog: model name -> ModelEntry."""

    def __init__(self, entries: Mapping[str, ModelEntry], implicit: ImplicitModel) -> None:
        self._entries: Mapping[str, ModelEntry] = MappingProxyType(dict(entries))
        self.implicit = implicit
        # the most input images any model takes per operation (1 where none has the endpoint: the
        # policy then says so), what a multipart reader may accept before it knows the model
        self.most_images: Mapping[Operation, int] = MappingProxyType(
            {
                operation: max(
                    (rule.max_images for e in entries.values() if (rule := e.upload_rule(operation))),
                    default=1,
                )
                for operation in ("edit", "variation")
            }
        )

    def __getitem__(self, name: str) -> ModelEntry:
        return self._entries[name]

    def get(self, name: str) -> ModelEntry | None:  # type: ignore[override]
        """The entry of `name`, or None: asked for every request (Mapping's own `get` is a Python
        try/except around `__getitem__`, several times the cost)."""
        return self._entries.get(name)

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
