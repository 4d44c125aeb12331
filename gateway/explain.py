"""`gateway explain`: what the gateway would decide for one request of one tenant, sending nothing.

Owns the admin's view of a decision: `explain` returns it as JSON-ready data (the outcome and the
status the client would get, the route, each violation and adjustment, the body as it would reach
the upstream, and the cost estimate with tokens per bucket and USD as decimal strings); `render`
prints the same for a human. Denied pattern rules are shown with their pattern, which clients never see.

A generation is given as its JSON body. An edit or a variation is given as
`{"operation": "edit" | "variation", "body": {fields}, "files": [{"field": "image[]" | "image" |
"mask", "format": "png", "width": 1024, "height": 1024, "bytes": 123456, "filename"?: ...}]}`:
the fields and what the files' headers say.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from gateway.config import Settings
from gateway.routing import load_world
from policies.cost import NANO_PER_USD, estimate, nano_usd_by_bucket
from policies.engine import Decision, evaluate
from policies.findings import POLICY_VIOLATION
from policies.rules import Policy
from policies.uploads import GENERATE, InputImage, Inputs


def explain(settings: Settings, tenant: str, request: Any) -> dict[str, Any]:
    """The decision for `request` from `tenant` (which must exist), as plain JSON-ready data."""
    catalog, targets = load_world(settings)
    policy = settings.policy_for(tenant)
    body, inputs = _request(request)
    decision = evaluate(policy, catalog, targets, body, inputs)
    status, code = _outcome(decision)
    return {
        "tenant": tenant,
        "operation": inputs.operation,
        "files": [image.describe() for image in (*inputs.images, *([inputs.mask] if inputs.mask else []))],
        "policy": settings.tenants[tenant].policy,
        "mode": policy.mode,
        "allowed": decision.allowed,
        "status": status,
        "code": code,
        "model": decision.model,
        "route": _route(settings, decision),
        "error": decision.error.to_dict() if decision.error else None,
        "violations": [_violation(v.to_dict(), policy) for v in decision.violations],
        "adjustments": [a.to_dict() for a in decision.adjustments],
        "forwarded_body": _forwarded(settings, decision),
        "estimate": _estimate(decision, inputs),
    }


def _request(request: Any) -> tuple[Any, Inputs]:
    """The body and the files of an explained request (see the module docstring)."""
    if not isinstance(request, dict) or request.get("operation") not in ("edit", "variation"):
        return request, GENERATE
    files = [f for f in request.get("files") or [] if isinstance(f, dict)]
    images = tuple(_file(f) for f in files if f.get("field", "image[]") in ("image", "image[]"))
    masks = [_file(f) for f in files if f.get("field") == "mask"]
    body = request.get("body")
    return (body if isinstance(body, dict) else {}), Inputs(
        request["operation"], images, masks[0] if masks else None
    )


def _file(described: dict[str, Any]) -> InputImage:
    def number(key: str) -> int:
        value = described.get(key)
        return value if isinstance(value, int) and value >= 0 else 0

    kind = described.get("format")
    return InputImage(
        str(described.get("field", "image[]")),
        str(described.get("filename", "")),
        str(described.get("content_type", "")),
        kind if isinstance(kind, str) else None,
        number("width"),
        number("height"),
        number("bytes"),
    )


def _outcome(decision: Decision) -> tuple[int, str | None]:
    if decision.error is not None:
        return 400, decision.error.code
    if decision.violations and not decision.shadow:
        return 403, POLICY_VIOLATION
    return 200, None


def _route(settings: Settings, decision: Decision) -> dict[str, Any] | None:
    if decision.model is None or decision.model not in settings.routes or decision.entry is None:
        return None
    first = settings.routes[decision.model].all_targets[0]
    return {
        "upstream": first.upstream,
        "upstream_model": first.model or decision.model,
        "catalog": decision.entry.name,
    }


def _violation(found: dict[str, Any], policy: Policy) -> dict[str, Any]:
    if found["rule"] == "deny_prompt_patterns":
        found["patterns"] = list(policy.deny_prompt_patterns)
    return found


def _forwarded(settings: Settings, decision: Decision) -> dict[str, Any] | None:
    """The body as the upstream would receive it (its own model id), or None when nothing is sent."""
    if not decision.allowed or decision.model is None:
        return None
    first = settings.routes[decision.model].all_targets[0]
    return {**decision.body, "model": first.model or decision.model}


def usd(nano: int) -> str:
    """nano-USD as a decimal string of dollars, exact to the nano-dollar."""
    return f"{Decimal(nano) / NANO_PER_USD:.9f}"


def _estimate(decision: Decision, inputs: Inputs) -> dict[str, Any] | None:
    if decision.entry is None:
        return None
    cost = estimate(decision.body, decision.entry, inputs)
    return {
        "images": cost.images,
        "tokens": {
            "text_in": cost.text_in_tokens,
            "image_in": cost.image_in_tokens,
            "image_out": cost.image_out_tokens,
            "total": cost.tokens,
        },
        "usd": usd(cost.nano_usd),
        "usd_by_bucket": {k: usd(v) for k, v in nano_usd_by_bucket(cost, decision.entry).items()},
    }


def render(result: dict[str, Any]) -> str:
    """`explain`'s result as text for a terminal."""
    verdict = "ALLOWED" if result["allowed"] else "DENIED"
    if result["allowed"] and result["violations"]:
        verdict = "ALLOWED (shadow mode: the violations below are only logged and counted)"
    code = f" {result['code']}" if result["code"] else ""
    lines = [
        f"tenant {result['tenant']} (policy {result['policy']}, mode {result['mode']})",
        f"operation: {result['operation']}",
        f"decision: {verdict}, status {result['status']}{code}",
        f"model: {_model_line(result)}",
    ]
    lines += _section("files", [_file_line(f) for f in result["files"]])
    if result["error"]:
        lines.append(f"error [{result['error']['param']}]: {result['error']['message']}")
    lines += _section("violations", [_violation_line(v) for v in result["violations"]])
    lines += _section("adjustments", [_adjustment_line(a) for a in result["adjustments"]])
    if result["forwarded_body"] is not None:
        lines += _section(
            "forwarded body", [f"{k}: {_value(v)}" for k, v in result["forwarded_body"].items()]
        )
    if result["estimate"]:
        lines += _section("estimate", _estimate_lines(result["estimate"]))
    return "\n".join(lines)


def _file_line(file: dict[str, Any]) -> str:
    size = f"{file['width']}x{file['height']}"
    return f"{file['field']} {file['filename']!r}: {file['format']} {size}, {file['bytes']} bytes"


def _model_line(result: dict[str, Any]) -> str:
    route = result["route"]
    if route is None:
        return str(result["model"] or "none")
    return (
        f"{result['model']} -> upstream {route['upstream']} as {route['upstream_model']}"
        f" (catalog entry {route['catalog']})"
    )


def _section(title: str, items: list[str]) -> list[str]:
    return [f"{title}:", *(f"  - {item}" for item in items)] if items else []


def _violation_line(found: dict[str, Any]) -> str:
    line = f"{found['rule']} [{found['param']}]: {found['message']}"
    if "patterns" in found:
        line += f" Patterns: {found['patterns']}"
    return line


def _adjustment_line(change: dict[str, Any]) -> str:
    return f"{change['param']}: {_value(change['before'])} -> {_value(change['after'])} ({change['reason']})"


def _value(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, str) and len(value) > 80:
        return f"{value[:60]!r}... ({len(value)} characters)"
    return str(value)


def _estimate_lines(cost: dict[str, Any]) -> list[str]:
    tokens = cost["tokens"]
    buckets = ", ".join(f"{k} ${v}" for k, v in cost["usd_by_bucket"].items())
    return [
        f"images: {cost['images']}",
        f"tokens: text_in {tokens['text_in']}, image_in {tokens['image_in']},"
        f" image_out {tokens['image_out']} (total {tokens['total']})",
        f"usd: ${cost['usd']} ({buckets})",
    ]
