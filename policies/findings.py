"""What an evaluation finds: a `Violation` (something refused) and an `Adjustment` (something changed).

Owns the error codes too. `Violation.code` is what the gateway puts in the error body's `code`:
capability errors and model resolution (400 `invalid_request_error`) use `invalid_value`,
`missing_required_parameter`, `unknown_parameter`, `model_not_found` or `model_deprecated`;
tenant-policy violations (403) carry `policy_violation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

INVALID_VALUE = "invalid_value"
MISSING_REQUIRED = "missing_required_parameter"
UNKNOWN_PARAMETER = "unknown_parameter"
MODEL_NOT_FOUND = "model_not_found"
MODEL_DEPRECATED = "model_deprecated"
POLICY_VIOLATION = "policy_violation"

CAPABILITY = "capability"  # the rule of every error the model itself would refuse
MODEL = "model"  # the rule of errors resolving `model` (unknown, retired)


@dataclass(frozen=True, slots=True)
class Violation:
    """A refusal. `rule` names the policy field (or `capability` / `model`); `param` the request field."""

    rule: str
    param: str | None
    message: str
    allowed: list[Any] | None = None
    code: str = POLICY_VIOLATION

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "param": self.param,
            "message": self.message,
            "allowed": self.allowed,
            "code": self.code,
        }


@dataclass(frozen=True, slots=True)
class Adjustment:
    """A change the gateway made to the request; `reason` says why (e.g. `policy clamp: max_n`)."""

    param: str
    before: Any  # None: the request did not carry the field
    after: Any  # None: the field was removed
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"param": self.param, "before": self.before, "after": self.after, "reason": self.reason}


SHOWN_CHARS = 64  # how much of a client's string a message quotes


def shown(value: Any) -> str:
    """A client's value as a message quotes it: bounded whatever its size or depth.

    Strings are quoted and cut at SHOWN_CHARS; containers are described, never rendered (a
    1,000-level array would exhaust `repr`'s recursion, a 1 MB one the message)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= SHOWN_CHARS else repr(value[:SHOWN_CHARS]) + "…"
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else f"{str(value)[:20]}…"
    if isinstance(value, list):
        return f"an array of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return f"an object of {len(value)} key{'s' if len(value) != 1 else ''}"
    return f"a value of type {type(value).__name__}"


def quoted(values: list[Any] | tuple[Any, ...]) -> str:
    """`'a', 'b', 'c'` for messages that list what is allowed."""
    return ", ".join(repr(v) for v in values) if values else "none"
