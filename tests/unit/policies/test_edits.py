"""Edits and variations in the policy engine: capabilities (400), tenant rules (403), input tokens."""

from __future__ import annotations

from typing import Any

import pytest

from policies.catalog import load_catalog
from policies.cost import estimate
from policies.engine import RouteTarget, evaluate
from policies.rules import Policy
from policies.uploads import InputImage, Inputs, image_tokens
from tests.unit.policies.world import CATALOG, ROUTES

DALL_E_ROUTES = {
    **ROUTES,
    "dall-e-2": RouteTarget("dall-e-2", "openai"),
    "dall-e-3": RouteTarget("dall-e-3", "openai"),
}


def png(
    width: int = 1024,
    height: int = 1024,
    *,
    field: str = "image[]",
    size: int = 1000,
    fmt: str | None = "png",
) -> InputImage:
    return InputImage(field, "a.png", "image/png", fmt, width, height, size)


def edit(*images: InputImage, mask: InputImage | None = None) -> Inputs:
    return Inputs("edit", images or (png(),), mask)


def decide_edit(body: dict[str, Any], inputs: Inputs | None = None, routes: Any = None, **policy: Any) -> Any:
    fields = {"prompt": "make it blue", **body}
    return evaluate(Policy(**policy), CATALOG, routes or DALL_E_ROUTES, fields, inputs or edit())


def error_of(decision: Any) -> tuple[str | None, str]:
    assert decision.error is not None, decision
    return decision.error.param, decision.error.code


REFUSED: list[tuple[dict[str, Any], Inputs, str, str]] = [
    ({"model": "dall-e-3"}, edit(), "model", "unsupported_operation"),
    ({"model": "gpt-image-1.5"}, Inputs("variation", (png(),)), "model", "unsupported_operation"),
    ({"model": "gpt-image-1.5", "moderation": "low"}, edit(), "moderation", "unknown_parameter"),
    ({"model": "gpt-image-1.5", "input_fidelity": "max"}, edit(), "input_fidelity", "invalid_value"),
    ({"model": "gpt-image-1-mini", "input_fidelity": "high"}, edit(), "input_fidelity", "invalid_value"),
    ({"model": "gpt-image-2", "input_fidelity": "low"}, edit(), "input_fidelity", "unknown_parameter"),
    ({"model": "gpt-image-1.5"}, Inputs("edit"), "image", "missing_required_parameter"),
    ({"model": "gpt-image-1.5"}, edit(*[png()] * 17), "image", "invalid_value"),
    ({"model": "gpt-image-1.5"}, edit(png(fmt="gif")), "image", "invalid_value"),
    ({"model": "gpt-image-1.5"}, edit(png(fmt=None)), "image", "invalid_value"),
    ({"model": "gpt-image-1.5"}, edit(png(size=50 * 2**20 + 1)), "image", "invalid_value"),
    ({"model": "gpt-image-1.5"}, edit(png(), mask=png(512, 512, field="mask")), "mask", "invalid_value"),
    ({"model": "gpt-image-1.5"}, edit(png(), mask=png(field="mask", fmt="jpeg")), "mask", "invalid_value"),
    # the mask is "less than 4MB" (the SDK's `mask`), though each image may be up to 50 MB
    (
        {"model": "gpt-image-1.5"},
        edit(png(), mask=png(field="mask", size=4 * 2**20 + 1)),
        "mask",
        "invalid_value",
    ),
    ({"model": "dall-e-2"}, edit(png(), mask=png(field="mask", size=4 * 2**20 + 1)), "mask", "invalid_value"),
    ({"model": "dall-e-2"}, edit(png(), png()), "image", "invalid_value"),
    ({"model": "dall-e-2"}, edit(png(1024, 512)), "image", "invalid_value"),
    ({"model": "dall-e-2"}, edit(png(fmt="webp")), "image", "invalid_value"),
    ({"model": "dall-e-2"}, edit(png(size=4 * 2**20 + 1)), "image", "invalid_value"),
    ({"model": "dall-e-2", "prompt": "x"}, Inputs("variation", (png(),)), "prompt", "unknown_parameter"),
    ({"model": "dall-e-2"}, Inputs("variation", (png(),), png(field="mask")), "mask", "invalid_value"),
    # the SDK's variation params have `user` only
    (
        {"model": "dall-e-2", "safety_identifier": "s"},
        Inputs("variation", (png(),)),
        "safety_identifier",
        "unknown_parameter",
    ),
]


@pytest.mark.parametrize(("body", "inputs", "param", "code"), REFUSED)
def test_what_the_model_cannot_do_is_a_400_naming_the_field(
    body: dict[str, Any], inputs: Inputs, param: str, code: str
) -> None:
    if inputs.operation == "variation":
        body = {"prompt": None, **body}
    assert error_of(decide_edit(body, inputs)) == (param, code)


def test_a_well_formed_edit_and_variation_pass() -> None:
    ok = decide_edit(
        {"model": "gpt-image-1.5", "input_fidelity": "high", "safety_identifier": "s"},
        edit(png(size=50 * 2**20), png(), mask=png(field="mask", size=4 * 2**20)),
    )
    assert ok.allowed and ok.error is None and ok.body["safety_identifier"] == "s"
    variation = evaluate(
        Policy(), CATALOG, DALL_E_ROUTES, {"model": "dall-e-2", "n": 2}, Inputs("variation", (png(),))
    )
    assert variation.allowed


def test_an_edit_to_an_upstream_without_edits_is_refused_before_anything_is_sent() -> None:
    decision = decide_edit({"model": "gpt-image-1"})  # routed to DigitalOcean in the test world
    assert error_of(decision) == ("model", "unsupported_operation")
    declared = {
        **ROUTES,
        "gpt-image-1": RouteTarget("gpt-image-1", "digitalocean", frozenset({"generate", "edit"})),
    }
    assert decide_edit({"model": "gpt-image-1"}, routes=declared).error is None


POLICY_BROKEN: list[tuple[dict[str, Any], dict[str, Any], Inputs, str, str]] = [
    ({"operations": ["generate"]}, {}, edit(), "operations", "operation"),
    ({"max_input_images": 2}, {}, edit(png(), png(), png()), "max_input_images", "image"),
    ({"input_fidelities": ["low"]}, {"input_fidelity": "high"}, edit(), "input_fidelities", "input_fidelity"),
    ({"allow_mask": False}, {}, edit(png(), mask=png(field="mask")), "allow_mask", "mask"),
    ({"max_n": 1}, {"n": 2}, edit(), "max_n", "n"),
    ({"stream": False}, {"stream": True}, edit(), "stream", "stream"),
    ({"deny_prompt_patterns": ["blue"]}, {}, edit(), "deny_prompt_patterns", "prompt"),
]


@pytest.mark.parametrize(("policy", "body", "inputs", "rule", "param"), POLICY_BROKEN)
def test_tenant_rules_apply_to_edits(
    policy: dict[str, Any], body: dict[str, Any], inputs: Inputs, rule: str, param: str
) -> None:
    decision = decide_edit({"model": "gpt-image-1.5", **body}, inputs, **policy)
    assert not decision.allowed and decision.error is None
    assert [(v.rule, v.param) for v in decision.violations] == [(rule, param)]
    shadow = decide_edit({"model": "gpt-image-1.5", **body}, inputs, mode="shadow", **policy)
    assert shadow.allowed


def test_moderation_rules_do_not_judge_an_edit_which_cannot_set_it() -> None:
    assert decide_edit({"model": "gpt-image-1.5"}, moderation=["low"]).allowed
    assert not decide_edit({"model": "gpt-image-1.5"}, input_fidelities=["high"]).allowed  # omitted = low


def test_a_generation_is_not_judged_by_edit_rules() -> None:
    decision = evaluate(
        Policy(operations=["generate"], allow_mask=False),
        CATALOG,
        ROUTES,
        {"prompt": "p", "model": "gpt-image-1.5"},
    )
    assert decision.allowed


def test_tile_rule_matches_the_measured_readings() -> None:
    rule = CATALOG["gpt-image-1.5"].input_image_tokens
    assert rule is not None
    assert image_tokens(rule, 1024, 1024) == 194  # one tile
    assert image_tokens(rule, 1024, 1025) == 194  # the short side scales to 512, rounded down
    assert image_tokens(rule, 512, 513) == 65 + 129 * 2
    assert image_tokens(rule, 1920, 1080) == 65 + 129 * 2  # 910x512


def test_patch_rule_is_bounded_by_its_budget() -> None:
    rule = CATALOG["gpt-image-2"].input_image_tokens
    assert rule is not None
    assert image_tokens(rule, 1024, 1024) == 1024
    assert image_tokens(rule, 512, 512) == 1024  # magnified 2x
    assert image_tokens(rule, 4000, 3000) <= 1536


def test_the_estimate_counts_input_images_fidelity_and_n() -> None:
    entry = CATALOG["gpt-image-1.5"]
    body = {"prompt": "p", "quality": "low", "size": "1024x1024"}
    plain = estimate(body, entry, edit(png(), png(1920, 1080)))
    assert plain.image_in_tokens == 194 + 323
    high = estimate({**body, "input_fidelity": "high"}, entry, edit(png(), png(1920, 1080)))
    assert high.image_in_tokens == 194 + 323 + 4160  # the first image only
    two = estimate({**body, "n": 2}, entry, edit(png()))
    assert two.image_in_tokens == 2 * 194
    assert estimate(body, entry).image_in_tokens == 0  # a generation


def test_catalog_overrides_reach_upload_rules() -> None:
    catalog = load_catalog({"gpt-image-1.5": {"edits": {"max_images": 2}}})
    rule = catalog["gpt-image-1.5"].edits
    assert rule is not None and rule.max_images == 2 and rule.formats == ["png", "webp", "jpeg"]
    assert rule.mask_max_bytes == 4 * 2**20
    catalog = load_catalog({"gpt-image-1.5": {"edits": {"mask_max_bytes": 1000}}})
    refused = evaluate(
        Policy(),
        catalog,
        ROUTES,
        {"model": "gpt-image-1.5", "prompt": "p"},
        edit(mask=png(field="mask", size=1001)),
    )
    assert refused.error is not None and refused.error.param == "mask"
    assert "gpt-image-1.5 takes a mask under 1000 bytes" in refused.error.message


def test_a_variation_without_model_falls_back_to_openais_default_not_a_generation_default() -> None:
    variation = Inputs("variation", (png(),))
    served = evaluate(Policy(default_model="gpt-image-1.5"), CATALOG, DALL_E_ROUTES, {}, variation)
    assert served.allowed and served.model == "dall-e-2"
    aliased = evaluate(Policy(default_model="gpt-image-1.5"), CATALOG, ROUTES, {}, variation)
    assert aliased.error is not None and aliased.error.code == "unsupported_operation"
    assert "dall-e-2 retired" in aliased.error.message  # says how it came to gpt-image-1-mini
