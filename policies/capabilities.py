"""Capability checks: what a model itself would refuse, decided from its catalog entry alone.

`check(entry, body, model)` returns the first problem as a `Violation` (rule `capability`, 400) or
None. Every check reads the body defensively: any JSON value may sit under any key. A `null` value
means "use the default", as the upstream treats it, so it is never an error. Parameters the gateway
does not know are refused (`unknown_parameter`): a policy cannot govern what it cannot read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

from policies import end_user, sizes
from policies.catalog import ModelEntry
from policies.entry import Operation
from policies.findings import (
    CAPABILITY,
    INVALID_VALUE,
    MISSING_REQUIRED,
    UNKNOWN_PARAMETER,
    Violation,
    quoted,
    shown,
)

# request parameter -> the ModelEntry field listing its values
ENUMS = {
    "quality": "qualities",
    "background": "backgrounds",
    "moderation": "moderation",
    "output_format": "output_formats",
    "response_format": "response_formats",
    "style": "styles",
    "input_fidelity": "input_fidelities",
}
RANGES = {"output_compression": "output_compression", "partial_images": "partial_images", "n": "n"}
# Most bodies have none of these: one look at the body's keys rules them all out.
_ENUM_PARAMS, _RANGE_PARAMS = frozenset(ENUMS), frozenset(RANGES)

Check = Callable[[ModelEntry, Mapping[str, Any], str], Violation | None]


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _error(param: str | None, message: str, allowed: list[Any] | None = None) -> Violation:
    return Violation(CAPABILITY, param, message, allowed, INVALID_VALUE)


def _unsupported(param: str, model: str) -> Violation:
    return _error(param, f"'{param}' is not supported by {model}.")


def _prompt(entry: ModelEntry, body: Mapping[str, Any], model: str) -> Violation | None:
    prompt = body.get("prompt")
    if prompt is None:
        return Violation(
            CAPABILITY, "prompt", "Missing required parameter: 'prompt'.", None, MISSING_REQUIRED
        )
    if not isinstance(prompt, str) or not 1 <= len(prompt) <= entry.prompt_max_chars:
        got = f"{len(prompt)} characters" if isinstance(prompt, str) else f"a {type(prompt).__name__}"
        return _error(
            "prompt",
            f"'prompt' must be a string of 1 to {entry.prompt_max_chars} characters for {model}; got {got}.",
        )
    return None


def _ranges(entry: ModelEntry, body: Mapping[str, Any], model: str) -> Violation | None:
    if _RANGE_PARAMS.isdisjoint(body):
        return None
    for param, field in RANGES.items():
        value = body.get(param)
        if value is None:
            continue
        span = getattr(entry, field)
        if span is None:
            return _unsupported(param, model)
        if value not in span:
            allowed = f"{span.min}" if span.min == span.max else f"an integer from {span.min} to {span.max}"
            return _error(
                param, f"'{param}' must be {allowed} for {model}; got {shown(value)}.", [span.min, span.max]
            )
    return None


def _enums(entry: ModelEntry, body: Mapping[str, Any], model: str) -> Violation | None:
    if _ENUM_PARAMS.isdisjoint(body):
        return None
    for param, field in ENUMS.items():
        value = body.get(param)
        if value is None:
            continue
        allowed = getattr(entry, field)
        if allowed is None:
            return _unsupported(param, model)
        if not isinstance(value, str) or value not in allowed:
            return _error(
                param,
                f"Invalid value for '{param}': {shown(value)}. {model} supports {quoted(allowed)}.",
                allowed,
            )
    return None


def size_problem(entry: ModelEntry, size: object, model: str) -> str | None:
    """Why `size` is not a size `model` can make, or None."""
    if size in entry.sizes:
        return None
    parsed = sizes.parse(size)
    rule = entry.arbitrary_sizes
    if parsed is None or rule is None:
        extra = " or WIDTHxHEIGHT within its size rule" if rule else ""
        return f"Invalid value for 'size': {shown(size)}. {model} supports {quoted(entry.sizes)}{extra}."
    broken = rule.problems(*parsed)
    return f"Invalid size {shown(size)} for {model}: {'; '.join(broken)}." if broken else None


def _size(entry: ModelEntry, body: Mapping[str, Any], model: str) -> Violation | None:
    size = body.get("size")
    problem = None if size is None else size_problem(entry, size, model)
    return _error("size", problem, entry.sizes) if problem else None


def _stream(entry: ModelEntry, body: Mapping[str, Any], model: str) -> Violation | None:
    stream = body.get("stream")
    if stream is None:
        return None
    if not isinstance(stream, bool):
        return _error("stream", f"'stream' must be true or false; got {shown(stream)}.")
    return _unsupported("stream", model) if stream and not entry.stream else None


def _user(entry: ModelEntry, body: Mapping[str, Any], model: str) -> Violation | None:
    """`user` and `safety_identifier` name the end user; neither may be longer than `user_max_chars`
    (OpenAI documents no limit of its own for `safety_identifier`: it is bounded like `user`)."""
    for param in end_user.FIELDS:
        value = body.get(param)
        if value is not None and not (isinstance(value, str) and len(value) <= entry.user_max_chars):
            return _error(param, f"'{param}' must be a string of at most {entry.user_max_chars} characters.")
    return None


def _combinations(entry: ModelEntry, body: Mapping[str, Any], model: str) -> Violation | None:
    compressed = body.get("output_compression") is not None
    transparent = body.get("background") == "transparent"
    if not compressed and not transparent:
        return None  # neither needs a particular output format
    fmt = entry.effective(body, "output_format")
    if compressed and fmt not in entry.compression_formats:
        return _error(
            "output_compression",
            f"'output_compression' needs output_format {quoted(entry.compression_formats)};"
            f" got {shown(fmt)}.",
        )
    if transparent and fmt not in entry.transparent_formats:
        return _error(
            "background",
            f"A transparent background needs output_format {quoted(entry.transparent_formats)};"
            f" got {shown(fmt)}.",
        )
    return None


def _unknown(params: frozenset[str], body: Mapping[str, Any], model: str) -> Violation | None:
    for param, value in body.items():
        if value is not None and param not in params:
            known = sorted(params)
            message = f"Unknown parameter: {shown(param)}. {model} takes {quoted(known)}."
            return Violation(CAPABILITY, str(param), message, known, UNKNOWN_PARAMETER)
    return None


CHECKS: tuple[Check, ...] = (_ranges, _size, _enums, _stream, _user, _combinations)


def check(
    entry: ModelEntry, body: Mapping[str, Any], model: str, operation: Operation = "generate"
) -> Violation | None:
    """The first thing `model` (served as `entry`) cannot do with `body` in `operation`, or None.

    A variation takes no prompt; fields an operation does not take (an edit's `moderation`, a
    variation's `quality`) are unknown parameters, as the upstream would answer."""
    params = entry.params(operation)
    found = _unknown(params, body, model) if operation != "generate" else None
    if found is None and operation != "variation":
        found = _prompt(entry, body, model)
    for each in CHECKS:
        if found is not None:
            return found
        found = each(entry, body, model)
    return found or _unknown(params, body, model)
