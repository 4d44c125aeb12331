"""Tenant-policy checks: each rule of a `Policy` against a request the model can serve, and clamps.

Owns the meaning of the policy fields. Rules judge the *effective* value (the body's, or the model's
default when the field is omitted), so leaving a field out never gets around a rule: with
`qualities: [low, medium]` an omitted quality is `auto`, which the policy does not allow.

- `models`: public model names (after the default model and retired aliasing).
- `sizes`: listed sizes (`auto` included only if listed). `max_pixels` / `max_edge` cap every
  `WxH` size, and setting either also admits any arbitrary size the model supports (gpt-image-2)
  within those caps, listed or not.
- `qualities`, `moderation`, `output_formats`, `backgrounds`: allowed values, judged only for models
  that take the parameter.
- `output_compression`: `{min, max}`, judged when the output format is one that is compressed.
- `stream`, `max_partial_images`, `max_n`, `max_prompt_chars`, `require_user` (an end user named by
  `policies.end_user`: a non-empty `safety_identifier`, else a non-empty `user`).
- `deny_prompt_patterns`: RE2 patterns matched case-insensitively on the normalised prompt (see
  `policies.prompts`); the message names the index of the pattern, never the pattern itself (an
  admin reads it with `gateway explain`).
- `operations` (`generate`, `edit`, `variation`; default all), `max_input_images`,
  `input_fidelities` (judged on the effective value: `low` when omitted), `allow_mask`: edits and
  variations. Every other rule applies to them as to generations, where the operation takes the field.

`on_violation: {n|quality|partial_images|size: clamp}` replaces the value with the nearest allowed
one and records an `Adjustment`: n and partial_images to the maximum; quality to the best allowed
quality not above the one asked (`auto`: the best allowed); size to the same aspect scaled into
`max_pixels`/`max_edge` when arbitrary sizes are admitted, else the allowed size closest in aspect
then pixel count (`auto`: the first allowed size, in the policy's order). In shadow mode nothing is
changed: a would-be clamp is reported as a violation that says what it would have done.

`auto` pins. The upstream resolves `auto` (or an omitted quality or size) by itself, not bound by
the policy. So when an enforced policy allows `auto` but narrows the values `auto` may resolve to
(some of the model's concrete qualities, or of its fixed sizes, are not allowed), `auto` is
rewritten to the costliest allowed value, recorded as an `Adjustment` (`policy pin: auto within
qualities|sizes`): quality at the model's worst size, ties to the better quality; size at the
model's worst quality, ties to the first in the model's list. The policy then binds the upstream
and the estimate is exact. A policy that narrows nothing, or allows no concrete value at all
(`sizes: [auto]`), leaves `auto` to the upstream; shadow mode never pins.

Omitted values. An omitted field means the model's default (`auto` for quality and size). When the
policy does not allow that default, the omitted field is filled with an allowed value (`policy
default: <default> is not in <rule>`) rather than refused: the client asked for nothing forbidden
(SDKs omit these fields). Quality and size get the costliest allowed value; moderation,
output_format and background the first value of the policy's list the model can serve with the
rest of the request. An explicit value (`auto` included) is judged like any value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from policies import capabilities, sizes
from policies.capabilities import is_int, size_problem
from policies.catalog import AUTO, ModelEntry
from policies.end_user import end_user
from policies.findings import Adjustment, Violation, quoted, shown
from policies.rules import Policy
from policies.uploads import GENERATE, Inputs
from policies.values import value_type


@dataclass(frozen=True, slots=True)
class Finding:
    """A broken rule; `clamp` is the nearest allowed value when the rule can clamp (else None)."""

    rule: str
    param: str
    message: str
    allowed: list[Any] | None = None
    value: Any = None
    clamp: Any = None


@value_type
class Request:
    """What the rules judge: read, never reassigned (clamps change `body` in place)."""

    policy: Policy
    entry: ModelEntry
    model: str
    body: dict[str, Any]
    inputs: Inputs = GENERATE

    def effective(self, param: str) -> Any:
        return self.entry.effective(self.body, param, self.inputs.operation)


Rule = Callable[[Request], Finding | None]
# The policy fields that fill omitted values (`_fill_omitted`) and pin `auto` (`_pin_auto`): a
# policy that sets none of them has neither, and skips the loops.
_FILLED = frozenset({"qualities", "sizes", "moderation", "output_formats", "backgrounds"})
_PINNED = frozenset({"qualities", "sizes", "max_pixels", "max_edge"})  # those narrowing quality or size


def enforce(
    policy: Policy, entry: ModelEntry, model: str, body: dict[str, Any], inputs: Inputs = GENERATE
) -> tuple[list[Violation], list[Adjustment]]:
    """Every rule `body` breaks, clamping in place where the policy says so (never in shadow mode)."""
    violations: list[Violation] = []
    adjustments: list[Adjustment] = []
    shadow = policy.mode == "shadow"
    req = Request(policy, entry, model, body, inputs)  # clamps change `body`, which `req` reads
    if not shadow:
        adjustments += _fill_omitted(req)
    for rule in _rules_for(policy.set_fields):
        found = rule(req)
        if found is None:
            continue
        clamp = found.clamp is not None and policy.clamps(found.param)
        if clamp and not shadow:
            body[found.param] = found.clamp
            adjustments.append(
                Adjustment(found.param, found.value, found.clamp, f"policy clamp: {found.rule}")
            )
            continue
        message = found.message + (f" Enforced, it would be clamped to {found.clamp!r}." if clamp else "")
        violations.append(Violation(found.rule, found.param, message, found.allowed))
    if not shadow:
        violated = {v.param for v in violations}
        adjustments += _pin_auto(req, violated)
    return violations, adjustments


def _pin_auto(req: Request, violated: set[str | None]) -> list[Adjustment]:
    """Rewrite an allowed `auto` quality or size that the policy narrows to its costliest allowed value.

    The upstream resolves `auto` by itself, unbound by the policy: left alone it may make an image the
    policy forbids and cost more than any allowed value. Pinned, the policy binds and the estimate is
    exact. A policy that narrows nothing (or allows no concrete value) leaves `auto` to the upstream.
    """
    pins: list[Adjustment] = []
    if req.policy.set_fields.isdisjoint(_PINNED):
        return pins  # the policy narrows neither: `auto` stays the upstream's
    for param, rule, narrowed, costliest in (
        ("quality", "qualities", req.policy.qualities is not None, _costliest_quality),
        ("size", "sizes", req.policy.narrows_sizes, _costliest_size),
    ):
        if not narrowed or param in violated or req.effective(param) != AUTO:
            continue
        value = costliest(req)
        if value is not None:
            pins.append(Adjustment(param, req.body.get(param), value, f"policy pin: auto within {rule}"))
            req.body[param] = value
    return pins


def _fill_omitted(req: Request) -> list[Adjustment]:
    """An omitted field means the model's default; where the policy does not allow that default,
    the client asked for nothing the policy forbids (SDKs omit these fields): it gets an allowed
    value instead of a violation, recorded as an adjustment. Quality and size get the costliest
    allowed value (the reservation then covers anything); moderation, output format and background
    the first value in the policy's list that the model can serve with the rest of the request.
    An explicit value, `auto` included, is still judged by the rules."""
    fills: list[Adjustment] = []
    policy = req.policy
    if policy.set_fields.isdisjoint(_FILLED):
        return fills  # the policy lists none of them: any default is allowed
    for param, rule, listed in (
        ("quality", "qualities", policy.qualities),
        ("size", "sizes", policy.sizes),
        ("moderation", "moderation", policy.moderation),
        ("output_format", "output_formats", policy.output_formats),
        ("background", "backgrounds", policy.backgrounds),
    ):
        if listed is None or req.body.get(param) is not None:
            continue
        default = req.effective(param)
        if default is None or default in listed:
            continue
        dearest = {"quality": _dearest_quality, "size": _dearest_size}.get(param)
        value = dearest(req) if dearest else _first_allowed(req, param, listed)
        if value is not None:
            fills.append(Adjustment(param, None, value, f"policy default: {default} is not in {rule}"))
            req.body[param] = value
    return fills


def _first_allowed(req: Request, param: str, listed: list[str]) -> str | None:
    """The first value of the policy's list the model accepts here (a transparent background only
    with a format that has one, and so on), or None."""
    for value in listed:
        if capabilities.check(req.entry, {**req.body, param: value}, req.model) is None:
            return value
    return None


def _dearest_quality(req: Request) -> str | None:
    """The allowed concrete quality dearest at the model's worst size (ties: the better one)."""
    allowed = _allowed_qualities(req)
    fixed = req.entry.fixed_sizes
    return max(reversed(allowed), key=lambda q: req.entry.worst_image_cost(fixed, [q]), default=None)


def _allowed_qualities(req: Request) -> list[str]:
    return [
        q for q in req.entry.concrete_qualities if req.policy.qualities is None or q in req.policy.qualities
    ]


def _dearest_size(req: Request) -> str | None:
    """The allowed size (fixed, or listed and made by the model) dearest at the worst quality, ties
    to the first in the model's list, then the policy's."""
    policy, entry = req.policy, req.entry
    allowed = [s for s in entry.fixed_sizes if size_allowed(policy, entry, s)]
    listed = [
        s
        for s in policy.sizes or []
        if s not in entry.fixed_sizes
        and sizes.parse(s)
        and size_problem(entry, s, req.model) is None
        and size_allowed(policy, entry, s)
    ]
    qualities = entry.concrete_qualities
    return max(allowed + listed, key=lambda s: entry.worst_image_cost([s], qualities), default=None)


def _costliest_quality(req: Request) -> str | None:
    """The dearest allowed quality, when the policy narrows the model's concrete qualities; None
    when it allows every one of them (or none)."""
    if len(_allowed_qualities(req)) == len(req.entry.concrete_qualities):
        return None
    return _dearest_quality(req)


def _costliest_size(req: Request) -> str | None:
    """The dearest allowed size, when the policy forbids some of the model's fixed sizes (those
    `auto` picks from); None when it forbids none of them (or allows no size)."""
    fixed = req.entry.fixed_sizes
    if all(size_allowed(req.policy, req.entry, s) for s in fixed):
        return None
    return _dearest_size(req)


def _shown(req: Request, param: str, value: Any) -> str:
    return shown(value) if req.body.get(param) is not None else f"{shown(value)} (the default when omitted)"


def _one_of(req: Request, rule: str, param: str, allowed: list[Any] | None) -> Finding | None:
    if allowed is None:
        return None
    value = req.effective(param)
    if value is None or value in allowed:
        return None
    message = (
        f"Policy rule '{rule}' allows {param} {quoted(allowed)}; the request has {_shown(req, param, value)}."
    )
    return Finding(rule, param, message, allowed, value)


def _at_most(req: Request, rule: str, param: str, limit: int | None) -> Finding | None:
    if limit is None:
        return None
    value = req.effective(param)
    if not is_int(value) or value <= limit:
        return None
    message = (
        f"Policy rule '{rule}' allows {param} up to {limit}; the request has {_shown(req, param, value)}."
    )
    return Finding(rule, param, message, [limit], value, limit)


def _models(req: Request) -> Finding | None:
    allowed = req.policy.models
    if allowed is None or req.model in allowed:
        return None
    return Finding(
        "models",
        "model",
        f"Policy rule 'models' allows {quoted(allowed)}; the request has {shown(req.model)}.",
        allowed,
        req.model,
    )


def _operations(req: Request) -> Finding | None:
    allowed, operation = req.policy.operations, req.inputs.operation
    if allowed is None or operation in allowed:
        return None
    message = f"Policy rule 'operations' allows {quoted(allowed)}; the request is {operation!r}."
    return Finding("operations", "operation", message, list(allowed), operation)


def _input_images(req: Request) -> Finding | None:
    limit, count = req.policy.max_input_images, len(req.inputs.images)
    if limit is None or count <= limit:
        return None
    message = f"Policy rule 'max_input_images' allows up to {limit} input images; the request has {count}."
    return Finding("max_input_images", "image", message, [limit], count)


def _mask(req: Request) -> Finding | None:
    if req.policy.allow_mask or req.inputs.mask is None:
        return None
    return Finding("allow_mask", "mask", "Policy rule 'allow_mask' does not allow a mask.", [], "mask")


def _require_user(req: Request) -> Finding | None:
    if not req.policy.require_user or end_user(req.body) is not None:
        return None
    message = (
        "Policy rule 'require_user': the request must name its end user in 'safety_identifier' or 'user'."
    )
    return Finding("require_user", "user", message)


def _prompt_chars(req: Request) -> Finding | None:
    prompt, limit = req.body.get("prompt"), req.policy.max_prompt_chars
    if limit is None or not isinstance(prompt, str) or len(prompt) <= limit:
        return None
    message = f"Policy rule 'max_prompt_chars' allows up to {limit} characters; the prompt has {len(prompt)}."
    return Finding("max_prompt_chars", "prompt", message, [limit], len(prompt))


def _deny_patterns(req: Request) -> Finding | None:
    prompt = req.body.get("prompt")
    if not isinstance(prompt, str):
        return None
    index = req.policy.deny.first_match(prompt)
    if index is None:
        return None
    message = f"Policy rule 'deny_prompt_patterns': the prompt matches pattern #{index}."
    return Finding("deny_prompt_patterns", "prompt", message)


def size_allowed(policy: Policy, entry: ModelEntry, size: str) -> bool:
    """Whether the policy admits `size` for this model (the model's own rule is checked elsewhere)."""
    dims = sizes.parse(size)
    if dims is not None:
        if policy.max_pixels is not None and dims[0] * dims[1] > policy.max_pixels:
            return False
        if policy.max_edge is not None and max(dims) > policy.max_edge:
            return False
    if policy.sizes is None or size in policy.sizes:
        return True
    arbitrary = entry.arbitrary_sizes is not None and (policy.max_pixels or policy.max_edge)
    return dims is not None and bool(arbitrary)


def _size_clamp(req: Request, size: str) -> str | None:
    policy, entry = req.policy, req.entry
    dims, rule = sizes.parse(size), entry.arbitrary_sizes
    if dims and rule and (policy.max_pixels or policy.max_edge):
        fitted = rule.fit(*dims, policy.max_pixels, policy.max_edge)
        if fitted and size_allowed(policy, entry, fitted):
            return fitted
    candidates = [
        s
        for s in (policy.sizes or entry.fixed_sizes)
        if sizes.parse(s) and size_problem(entry, s, req.model) is None and size_allowed(policy, entry, s)
    ]
    return sizes.nearest(size, candidates)


def _sizes(req: Request) -> Finding | None:
    policy = req.policy
    if not policy.narrows_sizes:
        return None
    size = req.effective("size")
    if not isinstance(size, str) or size_allowed(policy, req.entry, size):
        return None
    allowed = list(policy.sizes or [])
    caps = [
        f"{name} {value}"
        for name, value in (("max_pixels", policy.max_pixels), ("max_edge", policy.max_edge))
        if value
    ]
    limits = f" (WxH within {', '.join(caps)})" if caps else ""
    shown = _shown(req, "size", size)
    message = f"Policy rule 'sizes' allows size {quoted(allowed)}{limits}; the request has {shown}."
    return Finding("sizes", "size", message, allowed, size, _size_clamp(req, size))


def _quality_clamp(req: Request, quality: str) -> str | None:
    order = req.entry.concrete_qualities
    allowed = [q for q in order if req.policy.qualities is None or q in req.policy.qualities]
    if not allowed:
        return None
    if quality not in order:
        return allowed[-1]
    below = [q for q in allowed if order.index(q) <= order.index(quality)]
    return below[-1] if below else allowed[0]


def _qualities(req: Request) -> Finding | None:
    found = _one_of(req, "qualities", "quality", req.policy.qualities)
    return found and replace(found, clamp=_quality_clamp(req, found.value))


def _compression(req: Request) -> Finding | None:
    span, value = req.policy.output_compression, req.effective("output_compression")
    if span is None or req.effective("output_format") not in req.entry.compression_formats:
        return None
    if is_int(value) and span.min <= value <= span.max:
        return None
    shown = _shown(req, "output_compression", value)
    message = f"Policy rule 'output_compression' allows {span.min} to {span.max}; the request has {shown}."
    return Finding("output_compression", "output_compression", message, [span.min, span.max], value)


def _stream(req: Request) -> Finding | None:
    if req.policy.stream or req.body.get("stream") is not True:
        return None
    return Finding("stream", "stream", "Policy rule 'stream' does not allow streaming.", [False], True)


# Each rule after the policy fields that set it, in the order violations are reported. A rule whose
# fields all keep their defaults finds nothing whatever the request: `enforce` does not ask it.
RULES: tuple[tuple[tuple[str, ...], Rule], ...] = (
    (("operations",), _operations),
    (("models",), _models),
    (("require_user",), _require_user),
    (("max_prompt_chars",), _prompt_chars),
    (("deny_prompt_patterns",), _deny_patterns),
    (("sizes", "max_pixels", "max_edge"), _sizes),
    (("qualities",), _qualities),
    (("max_n",), lambda req: _at_most(req, "max_n", "n", req.policy.max_n)),
    (("moderation",), lambda req: _one_of(req, "moderation", "moderation", req.policy.moderation)),
    (
        ("output_formats",),
        lambda req: _one_of(req, "output_formats", "output_format", req.policy.output_formats),
    ),
    (("backgrounds",), lambda req: _one_of(req, "backgrounds", "background", req.policy.backgrounds)),
    (("output_compression",), _compression),
    (("stream",), _stream),
    (
        ("max_partial_images",),
        lambda req: _at_most(req, "max_partial_images", "partial_images", req.policy.max_partial_images),
    ),
    (("max_input_images",), _input_images),
    (
        ("input_fidelities",),
        lambda req: _one_of(req, "input_fidelities", "input_fidelity", req.policy.input_fidelities),
    ),
    (("allow_mask",), _mask),
)


@lru_cache(maxsize=64)  # keyed by the fields a policy sets: a few distinct sets per configuration
def _rules_for(set_fields: frozenset[str]) -> tuple[Rule, ...]:
    """The rules a policy setting `set_fields` has, in order."""
    return tuple(rule for fields, rule in RULES if not set_fields.isdisjoint(fields))
