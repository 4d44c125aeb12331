"""The shipped catalog, and the configuration's `catalog:` overrides and new models."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import pytest

from policies.catalog import CatalogError, load_catalog
from tests.unit.policies.world import CATALOG

FACTS_MODELS = {
    "gpt-image-1",
    "gpt-image-1-mini",
    "gpt-image-1.5",
    "gpt-image-2",
    "gpt-image-2-2026-04-21",
    "chatgpt-image-latest",
    "dall-e-2",
    "dall-e-3",
}


def test_every_model_of_facts_is_catalogued() -> None:
    assert set(CATALOG) == FACTS_MODELS
    assert CATALOG.get("no-such-model") is None


@pytest.mark.parametrize(
    ("model", "retired_on", "replacement"),
    [
        ("dall-e-2", date(2026, 5, 12), "gpt-image-1-mini"),
        ("dall-e-3", date(2026, 5, 12), "gpt-image-1.5"),
        ("gpt-image-1", date(2026, 10, 23), "gpt-image-1.5"),
    ],
)
def test_retired_models_carry_their_date_and_replacement(
    model: str, retired_on: date, replacement: str
) -> None:
    lifecycle = CATALOG[model].lifecycle
    assert (lifecycle.status, lifecycle.retired_on, lifecycle.replacement) == (
        "retired",
        retired_on,
        replacement,
    )


def test_prices_are_those_of_facts() -> None:
    prices = {
        name: CATALOG[name].prices
        for name in ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2")
    }
    assert {name: (p.text_in, p.image_in, p.image_out) for name, p in prices.items() if p} == {
        "gpt-image-1": (Decimal(5), Decimal(10), Decimal(40)),
        "gpt-image-1-mini": (Decimal(2), Decimal("2.5"), Decimal(8)),
        "gpt-image-1.5": (Decimal(5), Decimal(8), Decimal(32)),
        "gpt-image-2": (Decimal(5), Decimal(8), Decimal(30)),
    }
    assert CATALOG["gpt-image-1"].prices is not None and CATALOG[
        "gpt-image-1"
    ].prices.text_in_cached == Decimal("1.25")
    assert (
        CATALOG["gpt-image-1-mini"].prices is not None
        and CATALOG["gpt-image-1-mini"].prices.text_in_cached is None
    )
    assert CATALOG["dall-e-2"].image_price("512x512", "standard") == Decimal("0.018")


def test_extends_copies_everything_but_the_lifecycle() -> None:
    mini = CATALOG["gpt-image-1-mini"]
    assert mini.token_table == CATALOG["gpt-image-1"].token_table
    assert not mini.retired
    assert CATALOG["gpt-image-2-2026-04-21"].arbitrary_sizes == CATALOG["gpt-image-2"].arbitrary_sizes


def test_an_override_is_deep_merged_and_touches_no_other_model() -> None:
    catalog = load_catalog(
        {
            "gpt-image-1": {
                "n": {"max": 1},
                "token_table": {"1024x1024": {"high": 4200}},
                "lifecycle": {"on_retired": "reject"},
            }
        }
    )
    entry = catalog["gpt-image-1"]
    assert (entry.n.min, entry.n.max) == (1, 1)
    assert entry.token_table is not None and entry.token_table["1024x1024"] == {
        "low": 272,
        "medium": 1056,
        "high": 4200,
    }
    assert entry.lifecycle.on_retired == "reject" and entry.lifecycle.replacement == "gpt-image-1.5"
    assert catalog["gpt-image-1.5"].n.max == 10  # shipped children were resolved before the override


def test_a_new_model_can_extend_an_overridden_one() -> None:
    catalog = load_catalog(
        {
            "gpt-image-2": {"prices": {"image_out": 28}},
            "gpt-image-2.5-preview": {"extends": "gpt-image-2", "prompt_max_chars": 64000},
            "house-v2": {
                "extends": "gpt-image-2.5-preview",
                "prices": {"text_in": 1, "image_in": 1, "image_out": 1},
            },
        }
    )
    preview = catalog["gpt-image-2.5-preview"]
    assert preview.prompt_max_chars == 64000 and preview.prices is not None and preview.prices.image_out == 28
    assert catalog["house-v2"].prices is not None and catalog["house-v2"].prices.image_out == 1
    assert not catalog["house-v2"].retired


def test_a_complete_new_model_needs_no_extends() -> None:
    fields: dict[str, Any] = {
        "prompt_max_chars": 100,
        "n": {"min": 1, "max": 1},
        "sizes": ["512x512"],
        "default_size": "512x512",
        "qualities": ["standard"],
        "default_quality": "standard",
        "image_prices": {"512x512": {"standard": 0.01}},
    }
    assert load_catalog({"tiny": fields})["tiny"].per_image


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"gpt-image-1.5": {"n": {"max": "ten"}}}, "catalog.gpt-image-1.5.n.max: "),
        (
            {"gpt-image-1.5": {"n": {"min": 5, "max": 2}}},
            "catalog.gpt-image-1.5.n: min (5) is greater than max (2)",
        ),
        (
            {"gpt-image-1.5": {"colour": "blue"}},
            "catalog.gpt-image-1.5.colour: Extra inputs are not permitted",
        ),
        ({"gpt-image-1.5": "cheap"}, "catalog.gpt-image-1.5: must be a mapping of fields"),
        ({"gpt-image-1.5": {"name": "x"}}, "catalog.gpt-image-1.5.name: "),
        ({"gpt-image-1.5": {"extends": "gpt-image-2"}}, "catalog.gpt-image-1.5.extends: only a new model"),
        ({"new": {"extends": "nope"}}, "catalog.new.extends: unknown model 'nope'"),
        ({"a": {"extends": "b"}, "b": {"extends": "a"}}, "catalog.a.extends: circular (a -> b -> a)"),
        ({"new": {"prompt_max_chars": 5}}, "catalog.new.n: Field required"),
        (
            {"gpt-image-1.5": {"default_size": "640x480"}},
            "catalog.gpt-image-1.5.default_size: '640x480' is not one of sizes",
        ),
        (
            {"dall-e-3": {"response_formats": ["b64_json"]}},  # its default, url, left out
            "catalog.dall-e-3.default_response_format: 'url' is not one of response_formats",
        ),
        (
            {"gpt-image-1.5": {"sizes": ["auto", "big"]}},
            "catalog.gpt-image-1.5.sizes: 'big' is neither auto nor WIDTHxHEIGHT",
        ),
        ({"gpt-image-1.5": {"image_prices": {}}}, "catalog.gpt-image-1.5.prices: give exactly one of prices"),
        (
            {"new": {"extends": "gpt-image-1.5", "token_table": {"1024x1024": {"low": 1}}}},
            "catalog.new.token_table: no output tokens for 1024x1024 medium",
        ),
        (
            {"gpt-image-1.5": {"token_table": {"1024x1024": {"low": -1}}}},
            "catalog.gpt-image-1.5.token_table.1024x1024.low: ",
        ),
        (
            {"gpt-image-2": {"token_curve": {"high": [[1048576, 5000]]}}},
            "catalog.gpt-image-2.token_curve.high: below the token_table reading for 1024x1024 (7024)",
        ),
        (
            {"gpt-image-2": {"token_curve": {"high": [[2, 5], [1, 6]]}}},
            "catalog.gpt-image-2.token_curve.high: points must rise",
        ),
        (
            {"gpt-image-2": {"token_curve": {"high": []}}},
            "catalog.gpt-image-2.token_curve.high: List should have at least 1 item",
        ),
        (
            {
                "new": {
                    "extends": "gpt-image-1.5",
                    "arbitrary_sizes": {},
                    "token_curve": {"low": [[1, 1000]], "high": [[1, 9000]]},
                }
            },
            "catalog.new.token_curve: arbitrary sizes need a curve for quality 'medium'",
        ),
        (
            {"dall-e-3": {"lifecycle": {"replacement": "gpt-9"}}},
            "catalog.dall-e-3.lifecycle.replacement: unknown model 'gpt-9'",
        ),
        (
            {"dall-e-3": {"lifecycle": {"replacement": None}}},
            "catalog.dall-e-3.lifecycle: on_retired: alias needs a replacement",
        ),
        ({"dall-e-3": {"lifecycle": {"on_retired": "hide"}}}, "catalog.dall-e-3.lifecycle.on_retired: "),
        (
            {"dall-e-3": {"partial_images": {"min": 0, "max": 1}}},
            "catalog.dall-e-3.partial_images: needs stream: true",
        ),
    ],
)
def test_bad_overrides_are_reported_with_their_path(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(CatalogError) as caught:
        load_catalog(overrides)
    assert any(line.startswith(expected) for line in caught.value.errors), caught.value.errors


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(CatalogError) as caught:
        load_catalog(
            {"gpt-image-1.5": {"n": {"max": "x"}}, "gpt-image-2": {"colour": 1}, "new": {"extends": "nope"}}
        )
    assert len(caught.value.errors) == 3


def test_the_implicit_model_follows_openais_rule() -> None:
    assert CATALOG.implicit_model({"prompt": "x", "quality": "standard"}) == "dall-e-2"
    for param, value in [
        ("moderation", "low"),
        ("output_format", "png"),
        ("partial_images", 0),
        ("stream", True),
    ]:
        assert CATALOG.implicit_model({"prompt": "x", param: value}) == "gpt-image-1"
