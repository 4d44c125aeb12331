"""`auto` quality and size under a policy that narrows them: pinned to the costliest allowed value.

The upstream resolves `auto` by itself, unbound by the policy. An enforced policy that allows `auto`
but forbids some of the values it may resolve to rewrites it (an adjustment), so that the policy binds
and the estimate is exact; a policy that narrows nothing leaves `auto` to the upstream.
"""

from __future__ import annotations

from typing import Any

import pytest

from policies.catalog import load_catalog
from policies.cost import estimate
from policies.engine import Decision, RouteTarget
from policies.rules import Policy
from tests.unit.policies.world import CATALOG, ROUTES, decide

QUALITY_PIN = "policy pin: auto within qualities"
SIZE_PIN = "policy pin: auto within sizes"


def request(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-image-1.5", "prompt": "a cat", **fields}


def changes(decision: Decision) -> dict[str, tuple[Any, Any, str]]:
    assert decision.allowed, decision
    return {a.param: (a.before, a.after, a.reason) for a in decision.adjustments}


@pytest.mark.parametrize(
    ("policy", "quality"),
    [
        ({"qualities": ["low", "medium", "auto"]}, "medium"),
        ({"qualities": ["auto", "low"]}, "low"),
        ({"qualities": ["low", "high", "auto"]}, "high"),
        ({"qualities": ["medium", "auto", "low"], "on_violation": {"quality": "clamp"}}, "medium"),
    ],
)
@pytest.mark.parametrize("sent", [{}, {"quality": "auto"}, {"quality": None}])
def test_auto_quality_is_pinned_to_the_costliest_quality_allowed(
    policy: dict[str, Any], quality: str, sent: dict[str, Any]
) -> None:
    decision = decide(request(size="1024x1024", **sent), **policy)
    assert changes(decision) == {"quality": (sent.get("quality"), quality, QUALITY_PIN)}
    assert decision.body["quality"] == quality


@pytest.mark.parametrize(
    ("model", "policy", "size"),
    [
        ("gpt-image-1.5", {"sizes": ["1024x1024", "auto"]}, "1024x1024"),
        ("gpt-image-1.5", {"sizes": ["1024x1024", "1536x1024", "auto"]}, "1536x1024"),  # 6208 > 4160
        ("gpt-image-1.5", {"sizes": ["auto", "1536x1024", "1024x1536"]}, "1024x1536"),  # 6240 > 6208
        ("gpt-image-1.5", {"max_pixels": 1_100_000}, "1024x1024"),  # no `sizes`: the cap narrows
        ("gpt-image-1.5", {"max_edge": 1024}, "1024x1024"),
        ("gpt-image-2", {"sizes": ["1024x1024", "auto"]}, "1024x1024"),
        ("gpt-image-2", {"sizes": ["1536x864", "auto"]}, "1536x864"),  # a listed arbitrary size
        ("gpt-image-2", {"sizes": ["1024x1024", "2048x1152", "auto"]}, "2048x1152"),  # the dearer one
    ],
)
def test_auto_size_is_pinned_to_the_costliest_size_allowed(
    model: str, policy: dict[str, Any], size: str
) -> None:
    decision = decide(request(model=model, quality="low"), **policy)
    assert changes(decision) == {"size": (None, size, SIZE_PIN)}
    again = decide(request(model=model, quality="low", size="auto"), **policy)
    assert changes(again) == {"size": ("auto", size, SIZE_PIN)}


def test_both_are_pinned_and_the_estimate_is_then_exact() -> None:
    policy = Policy(qualities=["low", "medium", "auto"], sizes=["1024x1024", "1536x1024", "auto"])
    decision = decide(request(), **policy.model_dump())
    assert [(a.param, a.after) for a in decision.adjustments] == [
        ("quality", "medium"),
        ("size", "1536x1024"),
    ]
    assert decision.entry is not None
    assert estimate(decision.body, decision.entry).image_out_tokens == 1568  # the table, exactly


@pytest.mark.parametrize(
    "policy",
    [
        {},
        {
            "qualities": ["low", "medium", "high", "auto"],
            "sizes": ["1024x1024", "1536x1024", "1024x1536", "auto"],
        },
        {"qualities": ["auto"], "sizes": ["auto"]},  # no concrete value allowed: the upstream chooses
        {"sizes": ["1536x864", "auto"]},  # gpt-image-1.5 cannot make the one listed size
        {"max_pixels": 4_000_000, "max_edge": 2048},  # every fixed size fits
    ],
)
def test_a_policy_that_narrows_nothing_leaves_auto_to_the_upstream(policy: dict[str, Any]) -> None:
    assert changes(decide(request(), **policy)) == {}
    assert changes(decide(request(quality="auto", size="auto"), **policy)) == {}


def test_shadow_mode_never_pins() -> None:
    policy = {"mode": "shadow", "qualities": ["low", "auto"], "sizes": ["1024x1024", "auto"]}
    decision = decide(request(), **policy)
    assert decision.allowed and decision.violations == () and decision.adjustments == ()
    assert decision.body == request()


def test_concrete_values_are_never_pinned() -> None:
    policy = {"qualities": ["low", "medium", "auto"], "sizes": ["1024x1024", "1536x1024", "auto"]}
    assert changes(decide(request(quality="low", size="1024x1024"), **policy)) == {}


def test_a_disallowed_auto_is_a_violation_or_a_clamp_never_a_pin() -> None:
    denied = decide(request(size="1024x1024", quality="auto"), qualities=["low", "medium"])
    assert [v.rule for v in denied.violations] == ["qualities"] and denied.adjustments == ()
    clamped = decide(
        request(size="1024x1024", quality="auto"),
        qualities=["low", "medium"],
        on_violation={"quality": "clamp"},
    )
    assert changes(clamped) == {"quality": ("auto", "medium", "policy clamp: qualities")}
    # a request rejected for another rule still records no pin of the param it broke
    other = decide(request(n=3, size="auto"), qualities=["low", "auto"], sizes=["1024x1024"], max_n=2)
    assert {v.rule for v in other.violations} == {"sizes", "max_n"}
    assert [a.param for a in other.adjustments] == ["quality"]


def test_ties_go_to_the_first_size_of_the_model_and_the_better_quality() -> None:
    flat = {"1024x1024": {"low": 10, "medium": 20, "high": 20}}
    flat |= {size: {"low": 10, "medium": 30, "high": 30} for size in ("1536x1024", "1024x1536")}
    catalog = load_catalog({"gpt-image-1.5": {"token_table": flat}})
    narrowed = decide(
        request(),
        catalog=catalog,
        sizes=["1024x1536", "1536x1024", "auto"],
        qualities=["medium", "high", "auto"],
    )
    assert [(a.param, a.after) for a in narrowed.adjustments] == [("quality", "high"), ("size", "1536x1024")]


def test_digitalocean_gets_the_pinned_size_instead_of_its_auto_fill() -> None:
    decision = decide(
        {"model": "gpt-image-1", "prompt": "x"}, sizes=["1536x1024", "auto"], qualities=["low", "auto"]
    )
    assert changes(decision) == {
        "quality": (None, "low", QUALITY_PIN),
        "size": (None, "1536x1024", SIZE_PIN),
        "n": (None, 1, "digitalocean requires n"),
    }
    open_sizes = decide({"model": "gpt-image-1", "prompt": "x"}, qualities=["low", "auto"])
    assert changes(open_sizes)["size"] == (None, "auto", "digitalocean requires size")


def test_dall_e_has_no_auto_and_is_never_pinned() -> None:
    routes = {
        **ROUTES,
        "dall-e-3": RouteTarget("dall-e-3", "openai"),
        "dall-e-2": RouteTarget("dall-e-2", "openai"),
    }
    for model, policy in (
        ("dall-e-3", {"qualities": ["standard"], "sizes": ["1024x1024"]}),
        ("dall-e-2", {"sizes": ["256x256", "512x512"]}),
    ):
        decision = decide({"model": model, "prompt": "x", "size": policy["sizes"][0]}, routes, **policy)
        assert changes(decision) == {}
    assert CATALOG["dall-e-3"].default_quality == "standard" and "auto" not in CATALOG["dall-e-3"].sizes


def test_a_pinned_request_is_a_fixed_point() -> None:
    policy = {"qualities": ["low", "auto"], "sizes": ["1024x1024", "1536x1024", "auto"]}
    first = decide(request(), **policy)
    again = decide(first.body, **policy)
    assert again.allowed and again.adjustments == () and again.body == first.body
