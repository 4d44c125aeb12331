"""DigitalOcean routes get the fields its API requires and OpenAI does not; each fill is an adjustment."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.policies.world import decide


def fills(body: dict[str, Any], **policy: Any) -> dict[str, tuple[Any, Any, str]]:
    decision = decide({"model": "gpt-image-1", "prompt": "x", **body}, **policy)
    assert decision.allowed, decision
    return {a.param: (a.before, a.after, a.reason) for a in decision.adjustments}


def test_n_and_size_are_filled_with_the_defaults() -> None:
    assert fills({}) == {
        "n": (None, 1, "digitalocean requires n"),
        "size": (None, "auto", "digitalocean requires size"),
    }


def test_streaming_gets_one_partial_image() -> None:
    assert fills({"n": 1, "size": "auto", "stream": True}) == {
        "partial_images": (None, 1, "digitalocean requires partial_images > 0 when streaming")
    }


def test_an_explicit_zero_partial_images_is_raised_when_streaming() -> None:
    assert fills({"n": 1, "size": "auto", "stream": True, "partial_images": 0})["partial_images"][:2] == (
        0,
        1,
    )


@pytest.mark.parametrize(
    ("sent", "user"),
    [({"safety_identifier": "id-1", "user": "bob"}, "id-1"), ({"safety_identifier": ""}, None)],
)
def test_the_end_user_goes_as_user_the_field_digitalocean_documents(sent: dict[str, Any], user: Any) -> None:
    decision = decide({"model": "gpt-image-1", "prompt": "x", "n": 1, "size": "auto", **sent})
    assert decision.allowed, decision
    assert "safety_identifier" not in decision.body and decision.body.get("user") == user


@pytest.mark.parametrize(
    "body",
    [
        {"n": 1, "size": "1024x1536"},
        {"n": 1, "size": "1536x1024", "stream": True, "partial_images": 2},
        {"n": 1, "size": "auto", "stream": False},
    ],
)
def test_what_the_client_sent_is_kept(body: dict[str, Any]) -> None:
    assert fills(body) == {}


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"n": 2}, "n", "'n' must be 1 for gpt-image-1 on digitalocean; got 2."),
        (
            {"size": "1024x1024"},
            "size",
            "gpt-image-1 on digitalocean supports 'auto', '1536x1024', '1024x1536'",
        ),
    ],
)
def test_what_digitalocean_refuses_is_refused_before_sending(
    body: dict[str, Any], param: str, says: str
) -> None:
    """Its API reference: gpt-image-1 takes n=1 only, and sizes auto, 1536x1024 and 1024x1536."""
    decision = decide({"model": "gpt-image-1", "prompt": "x", **body})
    assert decision.error is not None and decision.error.param == param
    assert says in decision.error.message


def test_a_request_valid_on_both_flavors_is_served_by_both() -> None:
    body = {"prompt": "x", "n": 1, "size": "1536x1024", "quality": "low"}
    for model in ("gpt-image-1", "gpt-image-1.5"):
        assert decide({**body, "model": model}).allowed
    # the flavor's overlay applies to its routes only: OpenAI's gpt-image-1.5 still takes n=2
    assert decide({**body, "n": 2, "size": "1024x1024", "model": "gpt-image-1.5"}).allowed


def test_openai_routes_are_never_filled() -> None:
    decision = decide({"model": "gpt-image-1.5", "prompt": "x", "stream": True})
    assert decision.adjustments == () and decision.body == {
        "model": "gpt-image-1.5",
        "prompt": "x",
        "stream": True,
    }


def test_fills_apply_in_shadow_mode_and_after_clamps() -> None:
    decision = decide(
        {"model": "gpt-image-1", "prompt": "x", "stream": True, "partial_images": 3},
        max_partial_images=0,
        on_violation={"partial_images": "clamp"},
    )
    assert [(a.param, a.after) for a in decision.adjustments] == [
        ("partial_images", 0),
        ("n", 1),
        ("size", "auto"),
        ("partial_images", 1),
    ]
    shadow = decide({"model": "gpt-image-1", "prompt": "x"}, mode="shadow", max_n=1)
    assert {a.param for a in shadow.adjustments} == {"n", "size"}
