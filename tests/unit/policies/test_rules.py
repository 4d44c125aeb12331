"""Tenant-policy rules, each in enforce mode, shadow mode, and (where it can) with clamp."""

from __future__ import annotations

from typing import Any

import pytest

from policies.engine import RouteTarget
from tests.unit.policies.world import ROUTES, decide

# (policy, request fields, rule, param, the clamped value or None when the rule cannot clamp)
BROKEN: list[tuple[dict[str, Any], dict[str, Any], str, str, Any]] = [
    ({"models": ["gpt-image-2"]}, {}, "models", "model", None),
    ({"require_user": True}, {}, "require_user", "user", None),
    ({"require_user": True}, {"user": ""}, "require_user", "user", None),
    ({"require_user": True}, {"safety_identifier": ""}, "require_user", "user", None),
    ({"max_prompt_chars": 10}, {"prompt": "x" * 11}, "max_prompt_chars", "prompt", None),
    (
        {"deny_prompt_patterns": [r"\bnuclear\b"]},
        {"prompt": "a NUCLEAR plant"},
        "deny_prompt_patterns",
        "prompt",
        None,
    ),
    ({"deny_prompt_patterns": [r"^\s*$"]}, {"prompt": " \n\t"}, "deny_prompt_patterns", "prompt", None),
    ({"sizes": ["1024x1024"]}, {"size": "1536x1024"}, "sizes", "size", "1024x1024"),
    ({"sizes": ["1024x1024", "1024x1536"]}, {"size": "1536x1024"}, "sizes", "size", "1024x1024"),
    ({"sizes": ["1536x1024", "1024x1536"]}, {"size": "auto"}, "sizes", "size", "1536x1024"),
    ({"sizes": ["1024x1536"]}, {"size": "auto"}, "sizes", "size", "1024x1536"),
    ({"max_pixels": 2_000_000}, {"model": "gpt-image-2", "size": "3840x2160"}, "sizes", "size", "1872x1056"),
    ({"max_edge": 2048}, {"model": "gpt-image-2", "size": "3840x2160"}, "sizes", "size", "2048x1152"),
    ({"max_edge": 1024}, {"size": "1536x1024"}, "sizes", "size", "1024x1024"),
    ({"qualities": ["low", "medium"]}, {"quality": "high"}, "qualities", "quality", "medium"),
    ({"qualities": ["low", "medium"]}, {"quality": "auto"}, "qualities", "quality", "medium"),
    ({"qualities": ["medium", "high"]}, {"quality": "low"}, "qualities", "quality", "medium"),
    ({"qualities": ["low", "auto"]}, {"quality": "high"}, "qualities", "quality", "low"),
    ({"max_n": 2}, {"n": 4}, "max_n", "n", 2),
    ({"moderation": ["auto"]}, {"moderation": "low"}, "moderation", "moderation", None),
    ({"output_formats": ["png"]}, {"output_format": "jpeg"}, "output_formats", "output_format", None),
    ({"backgrounds": ["opaque", "auto"]}, {"background": "transparent"}, "backgrounds", "background", None),
    (
        {"output_compression": {"min": 50, "max": 90}},
        {"output_format": "jpeg", "output_compression": 20},
        "output_compression",
        "output_compression",
        None,
    ),
    (
        {"output_compression": {"min": 50, "max": 90}},
        {"output_format": "webp"},  # omitted means 100
        "output_compression",
        "output_compression",
        None,
    ),
    ({"stream": False}, {"stream": True}, "stream", "stream", None),
    (
        {"max_partial_images": 1},
        {"stream": True, "partial_images": 3},
        "max_partial_images",
        "partial_images",
        1,
    ),
]
IDS = [f"{rule}-{i}" for i, (_, _, rule, _, _) in enumerate(BROKEN)]


def request(fields: dict[str, Any]) -> dict[str, Any]:
    return {"model": "gpt-image-1.5", "prompt": "a cat", **fields}


@pytest.mark.parametrize(("policy", "fields", "rule", "param", "clamped"), BROKEN, ids=IDS)
def test_enforce_denies_with_the_rule_and_param(
    policy: dict[str, Any], fields: dict[str, Any], rule: str, param: str, clamped: Any
) -> None:
    decision = decide(request(fields), **policy)
    assert decision.error is None
    assert not decision.allowed and not decision.shadow
    [violation] = decision.violations
    assert (violation.rule, violation.param, violation.code) == (rule, param, "policy_violation")
    assert f"'{rule}'" in violation.message
    assert decision.adjustments == ()


@pytest.mark.parametrize(("policy", "fields", "rule", "param", "clamped"), BROKEN, ids=IDS)
def test_shadow_reports_and_lets_through_unchanged(
    policy: dict[str, Any], fields: dict[str, Any], rule: str, param: str, clamped: Any
) -> None:
    clamp: dict[str, Any] = {"on_violation": {param: "clamp"}} if clamped is not None else {}
    decision = decide(request(fields), mode="shadow", **clamp, **policy)
    assert decision.allowed and decision.shadow
    assert [v.rule for v in decision.violations] == [rule]
    assert decision.body == request(fields)  # shadow mode never changes a request, not even to clamp
    if clamped is not None:
        assert f"would be clamped to {clamped!r}" in decision.violations[0].message


CLAMPABLE = [case for case in BROKEN if case[4] is not None]


@pytest.mark.parametrize(("policy", "fields", "rule", "param", "clamped"), CLAMPABLE)
def test_clamp_adjusts_to_the_nearest_allowed_value_and_says_so(
    policy: dict[str, Any], fields: dict[str, Any], rule: str, param: str, clamped: Any
) -> None:
    decision = decide(request(fields), on_violation={param: "clamp"}, **policy)
    assert decision.allowed and decision.violations == ()
    assert decision.body[param] == clamped
    [adjustment] = decision.adjustments
    assert (adjustment.param, adjustment.after) == (param, clamped)
    assert adjustment.before == request(fields).get(param, adjustment.before)
    assert adjustment.reason == f"policy clamp: {rule}"
    assert decide(decision.body, **policy).allowed  # a clamped request passes the same policy


def test_a_clamp_with_no_allowed_value_is_a_violation() -> None:
    decision = decide(request({"quality": "high"}), qualities=["auto"], on_violation={"quality": "clamp"})
    assert [v.rule for v in decision.violations] == ["qualities"]


def test_clamp_applies_only_to_the_rules_named() -> None:
    decision = decide(
        request({"n": 4, "quality": "high"}), max_n=2, qualities=["low"], on_violation={"n": "clamp"}
    )
    assert [v.rule for v in decision.violations] == ["qualities"]
    assert [a.param for a in decision.adjustments] == ["n"]


def test_every_violation_is_listed_and_the_first_names_the_param() -> None:
    decision = decide(
        request({"model": "gpt-image-2", "n": 3, "moderation": "low", "stream": True}),
        models=["gpt-image-1.5"],
        max_n=1,
        moderation=["auto"],
        stream=False,
        require_user=True,
    )
    assert [v.rule for v in decision.violations] == [
        "models",
        "require_user",
        "max_n",
        "moderation",
        "stream",
    ]
    assert decision.violations[0].param == "model"
    assert all(v.code == "policy_violation" for v in decision.violations)


def test_violation_messages_name_the_allowed_values_and_defaults() -> None:
    # dall-e-3's default quality is a concrete one: omitted, it is filled with an allowed one if the
    # model has any, else judged as that default
    routes = {**ROUTES, "dall-e-3": RouteTarget("dall-e-3", "openai")}
    filled = decide({"model": "dall-e-3", "prompt": "a cat"}, routes, qualities=["hd"])
    assert filled.allowed and filled.body["quality"] == "hd"
    [violation] = decide({"model": "dall-e-3", "prompt": "a cat"}, routes, qualities=["low"]).violations
    assert violation.allowed == ["low"]
    assert "'standard' (the default when omitted)" in violation.message


@pytest.mark.parametrize(
    ("policy", "filled"),
    [
        ({"qualities": ["low", "medium"]}, {"quality": "medium"}),
        ({"sizes": ["1024x1024", "1536x1024"]}, {"size": "1536x1024"}),
        ({"qualities": ["low"], "sizes": ["1024x1024"]}, {"quality": "low", "size": "1024x1024"}),
    ],
)
def test_an_omitted_value_the_policy_lists_without_auto_gets_the_costliest_allowed_one(
    policy: dict[str, Any], filled: dict[str, str]
) -> None:
    """SDKs omit quality and size by default: that asks for nothing the policy forbids."""
    decision = decide(request({}), **policy)
    assert decision.allowed and not decision.violations
    assert {a.param: (a.before, a.after) for a in decision.adjustments} == {
        param: (None, value) for param, value in filled.items()
    }
    assert all(a.reason.startswith("policy default: auto is not in") for a in decision.adjustments)
    assert all(decision.body[param] == value for param, value in filled.items())
    assert decide(request({}), mode="shadow", **policy).violations  # shadow changes nothing


@pytest.mark.parametrize(
    ("policy", "body", "filled"),
    [
        ({"backgrounds": ["opaque"]}, {}, {"background": "opaque"}),
        ({"output_formats": ["webp", "jpeg"]}, {}, {"output_format": "webp"}),
        ({"moderation": ["low"]}, {}, {"moderation": "low"}),
        # the first listed value the rest of the request allows: jpeg has no transparent background
        ({"backgrounds": ["transparent", "opaque"]}, {"output_format": "jpeg"}, {"background": "opaque"}),
        # and a transparent background needs a format that has one
        ({"output_formats": ["jpeg", "webp"]}, {"background": "transparent"}, {"output_format": "webp"}),
    ],
)
def test_an_omitted_enum_the_policy_does_not_allow_by_default_gets_an_allowed_value(
    policy: dict[str, Any], body: dict[str, Any], filled: dict[str, str]
) -> None:
    """Every omitted field is treated alike: a plain SDK call under `backgrounds: [opaque]` is served
    with an opaque background, announced, instead of refused for the default it never asked for."""
    decision = decide(request(body), **policy)
    assert decision.allowed and not decision.violations
    assert {a.param: (a.before, a.after) for a in decision.adjustments} == {
        param: (None, value) for param, value in filled.items()
    }
    assert all(a.reason.startswith("policy default: ") for a in decision.adjustments)
    assert all(decision.body[param] == value for param, value in filled.items())
    assert decide(request(body), mode="shadow", **policy).violations  # shadow changes nothing


def test_an_explicit_value_is_still_judged() -> None:
    [violation] = decide(request({"background": "auto"}), backgrounds=["opaque"]).violations
    assert violation.rule == "backgrounds"


def test_deny_patterns_do_not_reveal_the_pattern_to_the_client() -> None:
    [violation] = decide(
        request({"prompt": "top secret plans"}), deny_prompt_patterns=["x^", "secret"]
    ).violations
    assert "#1" in violation.message and "secret" not in violation.message


ALLOWED: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"models": ["gpt-image-1.5"]}, {}),
    ({"models": ["house-style"]}, {"model": "house-style"}),
    ({"sizes": ["1024x1024", "auto"]}, {}),
    ({"sizes": ["1024x1024"], "max_pixels": 4_000_000}, {"model": "gpt-image-2", "size": "1536x864"}),
    ({"max_pixels": 1_048_576}, {"size": "1024x1024"}),
    ({"max_pixels": 1_048_576}, {"size": "auto"}),  # auto pinned: 1024x1024 is the only size within the cap
    ({"qualities": ["low", "auto"]}, {}),
    ({"max_n": 2}, {"n": 2}),
    (
        {"moderation": ["low"]},
        {"model": "dall-e-3"},
    ),  # dall-e takes no moderation: the rule has nothing to judge
    ({"output_compression": {"min": 50, "max": 90}}, {}),  # png: nothing is compressed
    ({"output_compression": {"min": 50, "max": 90}}, {"output_format": "jpeg", "output_compression": 90}),
    ({"stream": False}, {"stream": False}),
    ({"max_partial_images": 0}, {"stream": True}),
    ({"max_prompt_chars": 5}, {"prompt": "12345"}),
    ({"require_user": True}, {"user": "end-user-1"}),
    ({"require_user": True}, {"safety_identifier": "hashed-end-user-1"}),  # the SDK's successor to `user`
    ({"require_user": True}, {"safety_identifier": "", "user": "end-user-1"}),  # empty: `user` is used
    ({"deny_prompt_patterns": [r"\bnuclear\b"]}, {"prompt": "unclear skies"}),
    ({"deny_prompt_patterns": [r"^\s*$"]}, {"prompt": " a "}),
]


@pytest.mark.parametrize(("policy", "fields"), ALLOWED)
def test_requests_within_the_policy_pass(policy: dict[str, Any], fields: dict[str, Any]) -> None:
    routes = None
    if fields.get("model") == "dall-e-3":
        from policies.engine import RouteTarget
        from tests.unit.policies.world import ROUTES

        routes = {**ROUTES, "dall-e-3": RouteTarget("dall-e-3", "openai")}
    decision = decide(request(fields), routes, **policy)
    assert decision.allowed and decision.violations == (), decision
