"""The shared fixtures of the policy tests: the shipped catalog, a set of routes, and `decide`."""

from __future__ import annotations

from typing import Any

from policies.catalog import Catalog, load_catalog
from policies.engine import Decision, RouteTarget, evaluate
from policies.rules import Policy

CATALOG: Catalog = load_catalog()

OPENAI_MODELS = (
    "gpt-image-1.5",
    "gpt-image-2",
    "gpt-image-1-mini",
    "gpt-image-2-2026-04-21",
    "chatgpt-image-latest",
)
ROUTES: dict[str, RouteTarget] = {
    **{name: RouteTarget(name, "openai") for name in OPENAI_MODELS},
    "gpt-image-1": RouteTarget("gpt-image-1", "digitalocean"),  # retired at OpenAI, still served by DO
    "house-style": RouteTarget("gpt-image-1.5", "openai"),  # an alias with its own public name
}
# what the gateway sends upstream for each public name (the pipeline maps it; tests use it for the mock)
UPSTREAM_IDS = {**{name: name for name in OPENAI_MODELS}, "gpt-image-1": "openai-gpt-image-1"}


def decide(
    body: Any, routes: dict[str, RouteTarget] | None = None, catalog: Catalog = CATALOG, **policy: Any
) -> Decision:
    return evaluate(Policy(**policy), catalog, ROUTES if routes is None else routes, body)
