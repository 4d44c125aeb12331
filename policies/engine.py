"""The decision engine: `evaluate(policy, catalog, routes, body, inputs) -> Decision`, in a fixed order.

1. Model. `model` absent or null: the policy's `default_model` (when its model has an endpoint for
   the operation: a variation falls back to OpenAI's rule), else OpenAI's rule (dall-e-2 unless a
   GPT-image-only parameter is present; data in catalog.yaml). A name with a route is served as
   is, retired or not (the operator knows its upstream still serves it). A retired name without a
   route follows its catalog `lifecycle`: `alias` rewrites `model` to the replacement (following
   chains, translating parameter values the replacement names differently, e.g. dall-e-3's
   `quality: hd` -> `high`), `reject` answers `model_deprecated`. Anything else is `model_not_found`.
   A request is checked against the model it names before it is aliased: the client wrote it for
   that model, so what that model would refuse (dall-e-3's `n=2`) is refused, not quietly served by
   a replacement that happens to accept it; the replacement's own checks follow. A dall-e request
   that would get a URL (`response_format: url`, dall-e's default when omitted) is refused too: its
   GPT image replacement returns base64 only.
2. Capabilities: the first thing the model would refuse, as `error` (400): an operation the model
   has no endpoint for (dall-e-3 edits) or the route's upstream has no API for (DigitalOcean edits,
   unless declared), `policies.capabilities` on the fields (which differ per operation), then
   `policies.uploads` on an edit's or variation's files (count, formats, size, mask). All as the
   route's upstream serves the model: an entry's `flavors` overlay narrows what that flavor's
   upstream takes (DigitalOcean: n=1, three sizes), and the message says so ("gpt-image-1 on
   digitalocean").
   A `null` for a parameter the model does not take passes (null means "the default") but is
   dropped, unreported (its name is the client's): the upstream would refuse it as unknown.
3. Tenant policy (`policies.tenant`): every broken rule, as `violations` (403 unless shadow), and
   clamps and `auto` pins (an `auto` quality or size the policy narrows becomes the costliest
   allowed value), as `adjustments`; shadow mode changes nothing.
4. Upstream flavor: a DigitalOcean route gets what its API requires and OpenAI does not (FACTS.md
   section 5): `n` (1), `size` (the model's default, `auto` for GPT image models: DigitalOcean
   lists `auto` for gpt-image-1 while one of its documents omits 1024x1024, so `auto` is the one
   value both its documents accept, and it is what OpenAI does when size is omitted), and
   `partial_images: 1` when streaming without a positive value. These fills come after the policy
   and are not judged by it (they are the gateway's doing, not the client's: with
   `max_partial_images: 0` a stream to DigitalOcean still gets its one partial image, and the
   estimate counts it); they are adjustments too. A quality or size the policy pinned is already
   there, so a DigitalOcean route whose policy narrows sizes gets the pinned size, not `auto`.

Every change to the body is an `Adjustment`; `Decision.body` keeps the public model name.
`evaluate` never raises, whatever JSON value it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from policies import capabilities, tenant, uploads
from policies.capabilities import is_int
from policies.catalog import Catalog, ModelEntry
from policies.end_user import end_user
from policies.entry import Operation
from policies.findings import (
    CAPABILITY,
    INVALID_VALUE,
    MODEL,
    MODEL_DEPRECATED,
    MODEL_NOT_FOUND,
    Adjustment,
    Violation,
    quoted,
    shown,
)
from policies.rules import Policy
from policies.uploads import GENERATE, Inputs
from policies.values import value_type

__all__ = ["Adjustment", "Decision", "RouteTarget", "Violation", "evaluate", "for_flavor"]

Flavor = Literal["openai", "digitalocean"]
# The operations each flavor's API has: DigitalOcean's image API is generations only (FACTS.md 5)
FLAVOR_OPERATIONS: Mapping[Flavor, frozenset[str]] = {
    "openai": frozenset({"generate", "edit", "variation"}),
    "digitalocean": frozenset({"generate"}),
}


@dataclass(frozen=True, slots=True)
class RouteTarget:
    """What the engine needs to know of a route: its catalog entry, its upstream's flavor and the
    operations the upstream's API has (None: the flavor's, unless the operator declared them)."""

    catalog: str
    flavor: Flavor
    declared_operations: frozenset[str] | None = None

    @property
    def operations(self) -> frozenset[str]:
        declared = self.declared_operations
        return FLAVOR_OPERATIONS[self.flavor] if declared is None else declared


@value_type
class Decision:
    model: str | None  # the public model name (a key of routes) the request goes to
    entry: ModelEntry | None
    body: dict[str, Any]  # what to forward, with the public model name
    error: Violation | None  # 400: Violation.code is the error code
    violations: tuple[Violation, ...]  # 403 policy_violation unless shadow
    adjustments: tuple[Adjustment, ...]
    shadow: bool

    @property
    def allowed(self) -> bool:
        return self.error is None and (not self.violations or self.shadow)


@dataclass(slots=True)
class _Work:
    """The evaluation in progress: the body being rewritten and what was changed."""

    body: dict[str, Any]
    adjustments: list[Adjustment] = field(default_factory=list)

    def set(self, param: str, value: Any, reason: str) -> None:
        self.adjustments.append(Adjustment(param, self.body.get(param), value, reason))
        if value is None:
            self.body.pop(param, None)
        else:
            self.body[param] = value


def evaluate(
    policy: Policy,
    catalog: Catalog,
    routes: Mapping[str, RouteTarget],
    body: Mapping[str, Any],
    inputs: Inputs = GENERATE,
) -> Decision:
    """Decide what happens to one request; see the module docstring for the order of the steps."""
    shadow = policy.mode == "shadow"
    raw: object = body  # typed as a mapping for callers, but any JSON value must be answered
    if not isinstance(raw, dict) and not isinstance(raw, Mapping):  # an ABC's isinstance is slow
        not_object = Violation(
            CAPABILITY, None, "The request body must be a JSON object.", None, INVALID_VALUE
        )
        return Decision(None, None, {}, not_object, (), (), shadow)
    work = _Work(dict(raw))
    resolved = _resolve_model(policy, catalog, routes, work, inputs.operation)
    if isinstance(resolved, Violation):
        return Decision(None, None, work.body, resolved, (), tuple(work.adjustments), shadow)
    model, base = resolved
    flavor = routes[model].flavor
    entry = base.on(flavor)
    shown = model if entry is base else f"{model} on {flavor}"
    error = (
        _unsupported(entry, inputs, model, work)
        or _upstream_lacks(routes[model], inputs, model)
        or capabilities.check(entry, work.body, shown, inputs.operation)
        or uploads.check(entry, inputs, model)
    )
    violations: list[Violation] = []
    if error is None:
        _drop_null_unknown(entry, work, inputs)
        violations, clamps = tenant.enforce(policy, entry, model, work.body, inputs)
        work.adjustments.extend(clamps)
        if flavor == "digitalocean":
            _fill_digitalocean(entry, work)
    return Decision(model, entry, work.body, error, tuple(violations), tuple(work.adjustments), shadow)


def _upstream_lacks(target: RouteTarget, inputs: Inputs, model: str) -> Violation | None:
    """400 when the route's upstream has no API for the operation (DigitalOcean has no edits)."""
    if inputs.operation in target.operations:
        return None
    what = uploads.operation_name(inputs.operation)
    message = (
        f"The upstream serving {model} ({target.flavor}) has no API for {what}; nothing was sent. "
        "An operator who knows it does can declare it under upstreams.<name>.operations."
    )
    return Violation(CAPABILITY, "model", message, sorted(target.operations), uploads.UNSUPPORTED_OPERATION)


def _drop_null_unknown(entry: ModelEntry, work: _Work, inputs: Inputs) -> None:
    """A `null` means "the default" (so it passed the checks), but for a parameter this model
    does not take, the upstream would refuse it as unknown: it is not forwarded. Dropped without
    an adjustment: its name is the client's choice, never echoed into a header or a metric label."""
    if None not in work.body.values():
        return  # the usual body: no null anywhere
    params = entry.params(inputs.operation)
    for param in [p for p, v in work.body.items() if v is None and p not in params]:
        del work.body[param]


def _unsupported(entry: ModelEntry, inputs: Inputs, model: str, work: _Work) -> Violation | None:
    """The model has no endpoint for the operation; the message says how the model was chosen."""
    found = uploads.unsupported(entry, inputs.operation, model)
    if found is None:
        return None
    chosen = [a.reason for a in work.adjustments if a.param == "model"]
    if not chosen:
        return found
    return Violation(
        found.rule, found.param, f"{found.message[:-1]} ({'; '.join(chosen)}).", None, found.code
    )


def _resolve_model(
    policy: Policy,
    catalog: Catalog,
    routes: Mapping[str, RouteTarget],
    work: _Work,
    operation: Operation,
) -> tuple[str, ModelEntry] | Violation:
    name = work.body.get("model")
    if name is None:
        default = policy.default_model
        if default is not None and not _serves(catalog, routes, default, operation):
            default = None  # a default for generations (say) that has no such endpoint: OpenAI's rule
        name = default or catalog.implicit_model(work.body)
        reason = "policy default_model" if default else "OpenAI's default when model is omitted"
        work.set("model", name, reason)
    if not isinstance(name, str):
        return Violation(MODEL, "model", f"'model' must be a string; got {shown(name)}.", None, INVALID_VALUE)
    retired: list[str] = []
    wants_url: tuple[str, bool] | None = None  # (retired name, asked for it) of a client reading a URL
    while name not in routes:
        entry = catalog.get(name)
        if entry is None or not entry.retired or name in retired:
            return _unavailable(policy, routes, name, retired)
        if entry.lifecycle.on_retired == "reject":
            return _deprecated(entry, name)
        refused = capabilities.check(entry, work.body, name, operation)
        if refused is not None:  # what the named model itself would refuse stays refused
            return refused
        if wants_url is None and entry.effective(work.body, "response_format", operation) == "url":
            wants_url = (name, work.body.get("response_format") is not None)
        retired.append(name)
        name = _alias(entry, name, work)
    target_entry = catalog.get(routes[name].catalog)
    if target_entry is None:  # load_world refuses such a configuration; never trust it blindly
        message = f"The model {name!r} is routed but has no catalog entry {routes[name].catalog!r}."
        return Violation(MODEL, "model", message, None, MODEL_NOT_FOUND)
    refused = _url_refused(wants_url, name, target_entry, work, operation) if wants_url else None
    return refused or (name, target_entry)


def _serves(catalog: Catalog, routes: Mapping[str, RouteTarget], name: str, operation: Operation) -> bool:
    target = routes.get(name)
    entry = catalog.get(target.catalog) if target is not None else None
    return entry is not None and operation in entry.operations


def _url_refused(
    wants_url: tuple[str, bool], served: str, entry: ModelEntry, work: _Work, operation: Operation
) -> Violation | None:
    """400 when a retired model's client expects a URL that the model serving it cannot give.

    dall-e returns a URL unless asked for b64_json: `response_format` "Defaults to url" (OpenAI's
    API reference). A GPT image replacement returns base64 only, so a request that asks for `url`,
    or leaves `response_format` out, would be billed and answered with `data[0].url` null. It is
    refused before anything is sent, saying what to send instead. `wants_url`: the retired name the
    client wrote for, and whether it asked for `url` itself. A served model that takes
    `response_format`, or that has no endpoint for the operation (its own 400 says so), is left to
    its own checks."""
    if operation not in entry.operations or "response_format" in entry.params(operation):
        return None
    retired, asked = wants_url
    chosen = "".join(f" ({a.reason})" for a in work.adjustments if a.param == "model" and a.before is None)
    how = "asks for 'url'" if asked else f"leaves out response_format, which means 'url' for {retired}"
    message = (
        f"{retired}{chosen} is retired; its replacement {served} returns images as base64 only, never"
        f" as a URL, and the request {how}. Send response_format='b64_json' and read data[].b64_json."
    )
    return Violation(CAPABILITY, "response_format", message, ["b64_json"], INVALID_VALUE)


def _alias(entry: ModelEntry, name: str, work: _Work) -> str:
    """Rewrite the body for a retired model's replacement; return the replacement's name."""
    replacement = str(entry.lifecycle.replacement)
    work.set("model", replacement, f"{name} retired on {entry.lifecycle.retired_on}; served by {replacement}")
    for param, mapping in entry.lifecycle.translate.items():
        value = work.body.get(param)
        if isinstance(value, str) and value in mapping:
            work.set(param, mapping[value], f"{name} value translated for {replacement}")
    return replacement


def _deprecated(entry: ModelEntry, name: str) -> Violation:
    when, replacement = entry.lifecycle.retired_on, entry.lifecycle.replacement
    advice = f"use {replacement!r} instead" if replacement else "it is no longer available"
    message = f"The model {name!r} was retired{f' on {when}' if when else ''}; {advice}."
    return Violation(MODEL, "model", message, [replacement] if replacement else None, MODEL_DEPRECATED)


def _unavailable(
    policy: Policy, routes: Mapping[str, RouteTarget], name: str, retired: list[str]
) -> Violation:
    available = [r for r in routes if policy.models is None or r in policy.models]
    if retired:
        message = (
            f"The model {retired[0]!r} is retired and its replacement {shown(name)} is not served by this"
            f" gateway. Available: {quoted(available)}."
        )
        return Violation(MODEL, "model", message, available, MODEL_DEPRECATED)
    message = (
        f"The model {shown(name)} does not exist or is not served by this gateway."
        f" Available: {quoted(available)}."
    )
    return Violation(MODEL, "model", message, available, MODEL_NOT_FOUND)


def for_flavor(
    entry: ModelEntry, body: Mapping[str, Any], flavor: Flavor
) -> tuple[dict[str, Any], tuple[Adjustment, ...]]:
    """An evaluated body as another target of its route needs it (a route whose first target is
    OpenAI and whose next is DigitalOcean): the same fills as step 4, nothing else."""
    work = _Work(dict(body))
    if flavor == "digitalocean":
        _fill_digitalocean(entry, work)
    return work.body, tuple(work.adjustments)


def _fill_digitalocean(entry: ModelEntry, work: _Work) -> None:
    body = work.body
    if body.get("safety_identifier") is not None:
        # DigitalOcean documents `user` (FACTS.md 1), not its successor: the end user goes as `user`
        work.set("user", end_user(body), "digitalocean takes the end user as user")
        work.set("safety_identifier", None, "digitalocean documents user, not safety_identifier")
    for param in ("n", "size"):
        if body.get(param) is None:
            work.set(param, entry.effective(body, param), f"digitalocean requires {param}")
    partial = body.get("partial_images")
    if body.get("stream") is True and entry.partial_images and not (is_int(partial) and partial > 0):
        fill = max(1, entry.partial_images.min)
        work.set("partial_images", fill, "digitalocean requires partial_images > 0 when streaming")
