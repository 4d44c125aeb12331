"""Which model a request goes to: default model, OpenAI's implicit default, retired names, unknown names."""

from __future__ import annotations

from typing import Any

import pytest

from policies.catalog import load_catalog
from policies.engine import RouteTarget
from tests.unit.policies.world import ROUTES, decide


def changes(decision: Any) -> list[tuple[str, Any, Any]]:
    return [(a.param, a.before, a.after) for a in decision.adjustments]


def test_the_policy_default_model_fills_a_missing_model() -> None:
    decision = decide({"prompt": "x"}, default_model="gpt-image-2")
    assert decision.allowed and decision.model == "gpt-image-2"
    assert decision.body["model"] == "gpt-image-2"
    assert changes(decision) == [("model", None, "gpt-image-2")]
    assert decision.adjustments[0].reason == "policy default_model"


def test_a_null_model_is_a_missing_model() -> None:
    assert decide({"prompt": "x", "model": None}, default_model="gpt-image-2").model == "gpt-image-2"


def test_without_a_default_openai_rule_picks_dall_e_2_which_is_retired_and_aliased() -> None:
    decision = decide({"prompt": "x", "response_format": "b64_json"})
    assert decision.allowed and decision.model == "gpt-image-1-mini"
    assert changes(decision) == [
        ("model", None, "dall-e-2"),
        ("model", "dall-e-2", "gpt-image-1-mini"),
        ("response_format", "b64_json", None),
    ]


def test_a_gpt_image_only_parameter_makes_the_implicit_model_gpt_image_1() -> None:
    routes = {k: v for k, v in ROUTES.items() if k != "gpt-image-1"}
    decision = decide({"prompt": "x", "background": "opaque"}, routes)
    assert changes(decision)[:2] == [
        ("model", None, "gpt-image-1"),
        ("model", "gpt-image-1", "gpt-image-1.5"),
    ]
    assert decision.allowed and decision.model == "gpt-image-1.5"


def test_an_explicit_route_serves_a_retired_name() -> None:
    decision = decide({"model": "gpt-image-1", "prompt": "x", "n": 1, "size": "auto"})
    assert decision.allowed and decision.model == "gpt-image-1" and decision.adjustments == ()


def test_a_retired_name_without_a_route_is_aliased_and_its_values_translated() -> None:
    body = {
        "model": "dall-e-3",
        "prompt": "x",
        "quality": "hd",
        "size": "1792x1024",
        "style": "vivid",
        "response_format": "b64_json",
    }
    decision = decide(body)
    assert decision.allowed, decision
    assert decision.model == "gpt-image-1.5"
    assert decision.body == {"model": "gpt-image-1.5", "prompt": "x", "quality": "high", "size": "1536x1024"}
    assert changes(decision) == [
        ("model", "dall-e-3", "gpt-image-1.5"),
        ("quality", "hd", "high"),
        ("size", "1792x1024", "1536x1024"),
        ("style", "vivid", None),
        ("response_format", "b64_json", None),
    ]
    assert "retired on 2026-05-12" in decision.adjustments[0].reason


def test_a_request_the_retired_model_itself_would_refuse_is_refused_before_aliasing() -> None:
    """dall-e-3 takes n=1 only: its replacement takes n=2, but the client wrote for dall-e-3."""
    decision = decide({"model": "dall-e-3", "prompt": "x", "n": 2})
    assert decision.error is not None and (decision.error.param, decision.error.code) == (
        "n",
        "invalid_value",
    )
    assert decision.error.message == "'n' must be 1 for dall-e-3; got 2."
    assert decide({"model": "dall-e-3", "prompt": "x", "n": 1, "response_format": "b64_json"}).allowed


@pytest.mark.parametrize(
    ("body", "how"),
    [
        ({"model": "dall-e-2", "response_format": "url"}, "asks for 'url'"),
        ({"model": "dall-e-3"}, "leaves out response_format, which means 'url' for dall-e-3"),
        ({"model": "dall-e-3", "response_format": None}, "leaves out response_format"),
        ({}, "leaves out response_format, which means 'url' for dall-e-2"),  # the implicit dall-e-2
    ],
)
def test_a_dall_e_request_that_would_get_a_url_is_refused_before_aliasing(
    body: dict[str, Any], how: str
) -> None:
    """dall-e's response_format defaults to url; its GPT image replacement returns base64 only: served,
    the client would be billed and read `data[0].url == None`. The 400 says what to send."""
    decision = decide({"prompt": "x", **body})
    assert decision.error is not None and not decision.allowed
    assert (decision.error.param, decision.error.code, decision.error.allowed) == (
        "response_format",
        "invalid_value",
        ["b64_json"],
    )
    assert how in decision.error.message and "Send response_format='b64_json'" in decision.error.message
    assert ("OpenAI's default when model is omitted" in decision.error.message) == ("model" not in body)


def test_a_dall_e_request_for_a_url_is_served_where_the_model_serving_it_returns_urls() -> None:
    catalog = load_catalog({"dall-e-3": {"lifecycle": {"replacement": "dall-e-2", "translate": {}}}})
    routes = {**ROUTES, "dall-e-2": RouteTarget("dall-e-2", "openai")}
    decision = decide({"model": "dall-e-3", "prompt": "x"}, routes, catalog=catalog)
    assert decision.allowed and decision.model == "dall-e-2"


def test_the_tenant_policy_judges_the_model_after_aliasing() -> None:
    decision = decide(
        {"model": "dall-e-3", "prompt": "x", "response_format": "b64_json"}, models=["gpt-image-2"]
    )
    assert not decision.allowed and decision.violations[0].rule == "models"
    assert "'gpt-image-1.5'" in decision.violations[0].message


def test_on_retired_reject_answers_model_deprecated() -> None:
    catalog = load_catalog({"dall-e-3": {"lifecycle": {"on_retired": "reject"}}})
    decision = decide({"model": "dall-e-3", "prompt": "x"}, catalog=catalog)
    assert decision.error is not None
    assert (decision.error.code, decision.error.param) == ("model_deprecated", "model")
    assert "retired on 2026-05-12" in decision.error.message and "'gpt-image-1.5'" in decision.error.message
    assert decision.model is None and not decision.allowed


def test_a_retired_name_whose_replacement_is_not_routed_is_deprecated() -> None:
    decision = decide(
        {"model": "dall-e-3", "prompt": "x"}, {"gpt-image-2": RouteTarget("gpt-image-2", "openai")}
    )
    assert decision.error is not None and decision.error.code == "model_deprecated"
    assert decision.error.allowed == ["gpt-image-2"]


def test_retirement_chains_are_followed() -> None:
    catalog = load_catalog({"dall-e-3": {"lifecycle": {"replacement": "gpt-image-1"}}})
    routes = {k: v for k, v in ROUTES.items() if k != "gpt-image-1"}
    body = {"model": "dall-e-3", "prompt": "x", "response_format": "b64_json"}
    decision = decide(body, routes, catalog=catalog)
    assert decision.model == "gpt-image-1.5"
    assert changes(decision) == [
        ("model", "dall-e-3", "gpt-image-1"),
        ("response_format", "b64_json", None),
        ("model", "gpt-image-1", "gpt-image-1.5"),
    ]
    # a URL is refused at the end of a chain too, naming the model that serves the request
    refused = decide({"model": "dall-e-3", "prompt": "x"}, routes, catalog=catalog).error
    assert refused is not None and "its replacement gpt-image-1.5 returns" in refused.message


def test_a_retirement_cycle_ends_in_an_error() -> None:
    catalog = load_catalog(
        {"gpt-image-1.5": {"lifecycle": {"status": "retired", "replacement": "gpt-image-1"}}}
    )
    routes = {"gpt-image-2": RouteTarget("gpt-image-2", "openai")}
    decision = decide({"model": "gpt-image-1", "prompt": "x"}, routes, catalog=catalog)
    assert decision.error is not None and decision.error.code == "model_deprecated"


@pytest.mark.parametrize(
    "model", ["no-such-model", "gpt-image-2.5-preview", "gpt-image-1.5 ", "GPT-IMAGE-1.5"]
)
def test_an_unknown_model_is_model_not_found(model: str) -> None:
    decision = decide({"model": model, "prompt": "x"}, models=["gpt-image-1.5", "gpt-image-2"])
    assert decision.error is not None
    assert (decision.error.code, decision.error.param) == ("model_not_found", "model")
    assert decision.error.allowed == ["gpt-image-1.5", "gpt-image-2"]  # what this tenant may use
    assert decision.model is None and decision.entry is None


def test_an_available_model_without_a_route_is_not_found() -> None:
    routes = {"gpt-image-2": RouteTarget("gpt-image-2", "openai")}
    decision = decide({"model": "gpt-image-1.5", "prompt": "x"}, routes)
    assert decision.error is not None and decision.error.code == "model_not_found"


@pytest.mark.parametrize("model", [5, ["gpt-image-1.5"], {"id": "x"}, True])
def test_a_model_that_is_not_a_string_is_invalid(model: Any) -> None:
    decision = decide({"model": model, "prompt": "x"})
    assert decision.error is not None
    assert (decision.error.code, decision.error.param) == ("invalid_value", "model")


@pytest.mark.parametrize("body", [None, [], "text", 3, [{"prompt": "x"}]])
def test_a_body_that_is_not_an_object_is_invalid(body: Any) -> None:
    decision = decide(body)
    assert decision.error is not None and decision.error.code == "invalid_value"
    assert decision.body == {} and not decision.allowed


def test_a_route_whose_catalog_entry_is_missing_is_an_error_not_a_crash() -> None:
    decision = decide({"model": "x", "prompt": "p"}, {"x": RouteTarget("nope", "openai")})
    assert decision.error is not None and decision.error.code == "model_not_found"


def test_the_body_is_never_the_callers_object() -> None:
    body = {"prompt": "x"}
    decide(body, default_model="gpt-image-2")
    assert body == {"prompt": "x"}
