"""Capability checks: what the model itself would refuse is a 400 naming the field and what is allowed."""

from __future__ import annotations

from typing import Any

import pytest

from policies.engine import RouteTarget
from tests.unit.policies.world import ROUTES, decide

# dall-e models are retired at OpenAI; an operator still serving them routes them explicitly
DALL_E_ROUTES = {
    **ROUTES,
    "dall-e-3": RouteTarget("dall-e-3", "openai"),
    "dall-e-2": RouteTarget("dall-e-2", "openai"),
}

REFUSED: list[tuple[str, dict[str, Any], str, str, str]] = [
    # (model, fields, param, code, a fragment of the message)
    ("dall-e-3", {"n": 2}, "n", "invalid_value", "must be 1 for dall-e-3"),
    ("dall-e-2", {"n": 11}, "n", "invalid_value", "from 1 to 10"),
    ("gpt-image-1.5", {"n": 0}, "n", "invalid_value", "from 1 to 10"),
    ("gpt-image-1.5", {"n": "2"}, "n", "invalid_value", "'2'"),
    ("gpt-image-1.5", {"n": True}, "n", "invalid_value", "True"),
    ("gpt-image-1.5", {"n": 1.5}, "n", "invalid_value", "1.5"),
    ("gpt-image-1.5", {"response_format": "url"}, "response_format", "invalid_value", "not supported"),
    ("gpt-image-1.5", {"response_format": "b64_json"}, "response_format", "invalid_value", "not supported"),
    ("gpt-image-2", {"style": "vivid"}, "style", "invalid_value", "not supported by gpt-image-2"),
    ("dall-e-3", {"style": "moody"}, "style", "invalid_value", "'vivid', 'natural'"),
    ("dall-e-3", {"background": "opaque"}, "background", "invalid_value", "not supported by dall-e-3"),
    ("dall-e-2", {"quality": "hd"}, "quality", "invalid_value", "'standard'"),
    ("gpt-image-1.5", {"quality": "standard"}, "quality", "invalid_value", "'low', 'medium', 'high', 'auto'"),
    ("gpt-image-1.5", {"quality": "ultra"}, "quality", "invalid_value", "'ultra'"),
    ("gpt-image-1.5", {"moderation": "strict"}, "moderation", "invalid_value", "'low', 'auto'"),
    ("gpt-image-1.5", {"output_format": "gif"}, "output_format", "invalid_value", "'png', 'jpeg', 'webp'"),
    ("gpt-image-1.5", {"output_compression": 50}, "output_compression", "invalid_value", "'jpeg', 'webp'"),
    (
        "gpt-image-1.5",
        {"output_compression": 50, "output_format": "png"},
        "output_compression",
        "invalid_value",
        "got 'png'",
    ),
    (
        "gpt-image-1.5",
        {"output_compression": 101, "output_format": "jpeg"},
        "output_compression",
        "invalid_value",
        "from 0 to 100",
    ),
    (
        "gpt-image-1.5",
        {"background": "transparent", "output_format": "jpeg"},
        "background",
        "invalid_value",
        "'png', 'webp'",
    ),
    ("gpt-image-2", {"background": "transparent"}, "background", "invalid_value", "'opaque', 'auto'"),
    ("gpt-image-2-2026-04-21", {"background": "transparent"}, "background", "invalid_value", "'opaque'"),
    ("gpt-image-2", {"size": "1000x1000"}, "size", "invalid_value", "multiples of 16"),
    ("gpt-image-2", {"size": "3840x1024"}, "size", "invalid_value", "aspect ratio"),
    ("gpt-image-2", {"size": "4096x2048"}, "size", "invalid_value", "longest edge"),
    ("gpt-image-2", {"size": "3840x2176"}, "size", "invalid_value", "pixel count"),
    ("gpt-image-2", {"size": "768x768"}, "size", "invalid_value", "pixel count"),
    ("gpt-image-2", {"size": "big"}, "size", "invalid_value", "WIDTHxHEIGHT"),
    ("gpt-image-1.5", {"size": "1536x864"}, "size", "invalid_value", "'1024x1024'"),
    ("dall-e-3", {"size": "auto"}, "size", "invalid_value", "'1792x1024'"),
    ("dall-e-2", {"size": "1792x1024"}, "size", "invalid_value", "'256x256'"),
    ("gpt-image-1.5", {"size": 1024}, "size", "invalid_value", "1024"),
    ("gpt-image-1.5", {"partial_images": 4, "stream": True}, "partial_images", "invalid_value", "0 to 3"),
    ("gpt-image-1.5", {"partial_images": -1}, "partial_images", "invalid_value", "0 to 3"),
    ("dall-e-3", {"partial_images": 1}, "partial_images", "invalid_value", "not supported"),
    ("dall-e-3", {"stream": True}, "stream", "invalid_value", "not supported by dall-e-3"),
    ("gpt-image-1.5", {"stream": "yes"}, "stream", "invalid_value", "true or false"),
    ("gpt-image-1.5", {"user": "u" * 257}, "user", "invalid_value", "256"),
    ("gpt-image-1.5", {"user": 7}, "user", "invalid_value", "256"),
    ("gpt-image-1.5", {"safety_identifier": "s" * 257}, "safety_identifier", "invalid_value", "256"),
    ("gpt-image-2", {"safety_identifier": ["s"]}, "safety_identifier", "invalid_value", "256"),
    ("gpt-image-1.5", {"prompt": "x" * 32001}, "prompt", "invalid_value", "1 to 32000"),
    ("dall-e-3", {"prompt": "x" * 4001}, "prompt", "invalid_value", "1 to 4000"),
    ("dall-e-2", {"prompt": "x" * 1001}, "prompt", "invalid_value", "1 to 1000"),
    ("gpt-image-1.5", {"prompt": ""}, "prompt", "invalid_value", "got 0 characters"),
    ("gpt-image-1.5", {"prompt": ["a"]}, "prompt", "invalid_value", "a list"),
    ("gpt-image-1.5", {"prompt": None}, "prompt", "missing_required_parameter", "'prompt'"),
    ("gpt-image-1.5", {"seed": 42}, "seed", "unknown_parameter", "Unknown parameter: 'seed'"),
]


@pytest.mark.parametrize(("model", "fields", "param", "code", "fragment"), REFUSED)
def test_what_the_model_cannot_do_is_a_400(
    model: str, fields: dict[str, Any], param: str, code: str, fragment: str
) -> None:
    for mode in ("enforce", "shadow"):  # shadow mode never lets the model's own refusals through
        decision = decide({"model": model, "prompt": "a cat", **fields}, DALL_E_ROUTES, mode=mode)
        assert decision.error is not None, decision
        assert (decision.error.param, decision.error.code, decision.error.rule) == (param, code, "capability")
        assert fragment in decision.error.message
        assert not decision.allowed
        assert decision.model == model


ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    (
        "dall-e-3",
        {"n": 1, "size": "1792x1024", "quality": "hd", "style": "natural", "response_format": "url"},
    ),
    ("dall-e-2", {"n": 10, "size": "256x256", "response_format": "b64_json"}),
    ("dall-e-3", {"stream": False}),  # false is the default: harmless everywhere
    ("gpt-image-1.5", {"output_compression": 0, "output_format": "jpeg"}),
    ("gpt-image-1.5", {"background": "transparent", "output_format": "webp"}),
    ("gpt-image-1.5", {"background": "transparent"}),  # png by default
    ("gpt-image-1.5", {"stream": True, "partial_images": 0}),
    ("gpt-image-1.5", {"quality": None, "size": None, "response_format": None}),  # null means default
    ("gpt-image-2", {"size": "1536x864"}),
    ("gpt-image-2", {"size": "3840x2160"}),
    ("gpt-image-2", {"size": "1024x640"}),
    ("gpt-image-2", {"size": "2496x832"}),  # exactly 3:1
    ("gpt-image-2", {"size": "auto", "moderation": "low", "user": "u" * 256}),
    ("gpt-image-1.5", {"safety_identifier": "s" * 256}),  # the SDK's successor to `user`
    ("gpt-image-1.5", {"safety_identifier": "", "user": "u"}),  # empty: the API uses `user`
    ("dall-e-3", {"safety_identifier": "s"}),
    ("gpt-image-1.5", {"prompt": "x" * 32000, "n": 10}),
]


@pytest.mark.parametrize(("model", "fields"), ACCEPTED)
def test_what_the_model_can_do_passes(model: str, fields: dict[str, Any]) -> None:
    decision = decide({"model": model, "prompt": "a cat", **fields}, DALL_E_ROUTES)
    assert decision.error is None, decision.error
    assert decision.allowed


def test_a_route_alias_has_the_capabilities_of_its_catalog_entry() -> None:
    decision = decide({"model": "house-style", "prompt": "x", "response_format": "url"})
    assert decision.error is not None and decision.error.param == "response_format"
    assert "house-style" in decision.error.message  # messages name the model the client asked for
    assert decision.entry is not None and decision.entry.name == "gpt-image-1.5"


def test_capabilities_are_checked_before_the_tenant_policy() -> None:
    decision = decide({"model": "gpt-image-1.5", "prompt": "x", "n": 11}, max_n=1, models=["gpt-image-2"])
    assert decision.error is not None and decision.error.param == "n"
    assert decision.violations == ()


def test_a_null_the_model_does_not_take_is_dropped_not_forwarded() -> None:
    """`null` means "the default", so it is no error; but the upstream refuses a parameter it does
    not know, null or not, so it is not forwarded."""
    decision = decide(
        {"model": "gpt-image-1.5", "prompt": "a cat", "style": None, "extra": None, "user": None}
    )
    assert decision.allowed
    assert "style" not in decision.body and "x\r\nSet-Cookie: a" not in decision.body
    assert decision.body["user"] is None  # a parameter the model takes: its null is the upstream's to read
    assert decision.adjustments == ()  # a client-chosen name is never echoed (header, metric label)
