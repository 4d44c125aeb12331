"""gateway.routing (Settings -> catalog and route targets, start-up checks) and gateway.explain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway.config import ConfigError, Settings, load_settings, parse_settings
from gateway.explain import explain, render
from gateway.routing import load_world, route_targets
from policies.engine import RouteTarget

HASH = "sha256:" + "ab" * 32
ROOT = Path(__file__).resolve().parents[3]


def settings(**sections: Any) -> Settings:
    config: dict[str, Any] = {
        "upstreams": {
            "openai": {"base_url": "https://api.openai.com/v1"},
            "digitalocean": {"base_url": "https://inference.do-ai.run/v1"},
        },
        "routes": {
            "gpt-image-1.5": {"upstream": "openai"},
            "gpt-image-2": {"upstream": "openai"},
            "gpt-image-1": {"upstream": "digitalocean", "model": "openai-gpt-image-1"},
            "house-style": {"upstream": "openai", "model": "gpt-image-1.5", "catalog": "gpt-image-1.5"},
        },
        "policies": {
            "standard": {"default_model": "gpt-image-1.5", "max_n": 2, "qualities": ["low", "medium", "auto"]}
        },
        "tenants": {"team": {"policy": "standard", "keys": [HASH]}},
    }
    config.update(sections)
    return parse_settings(yaml.safe_dump(config), "<test>", environ={})


def test_route_targets_name_the_catalog_entry_and_the_flavor() -> None:
    base = settings()
    upstreams = {
        **base.model_dump()["upstreams"],
        "images": {"base_url": "https://inference.do-ai.run/v1"},
        "proxy": {"base_url": "http://127.0.0.1:9000/v1", "flavor": "digitalocean"},
        "other": {"base_url": "http://127.0.0.1:9001/v1"},
    }
    for upstream in upstreams.values():
        upstream["api_key"] = ""
    routes = {
        "a": {"upstream": "images", "catalog": "gpt-image-1"},
        "b": {"upstream": "proxy", "catalog": "gpt-image-1"},
        "c": {"upstream": "other", "catalog": "gpt-image-1"},
        "gpt-image-1": {"upstream": "digitalocean"},
        "house-style": {"upstream": "openai", "catalog": "gpt-image-1.5"},
    }
    targets = route_targets(settings(upstreams=upstreams, routes=routes, policies={}, tenants={}))
    assert targets == {
        "a": RouteTarget("gpt-image-1", "digitalocean"),  # the URL says so
        "b": RouteTarget("gpt-image-1", "digitalocean"),  # the setting says so
        "c": RouteTarget("gpt-image-1", "openai"),
        "gpt-image-1": RouteTarget("gpt-image-1", "digitalocean"),  # the upstream's name says so
        "house-style": RouteTarget("gpt-image-1.5", "openai"),
    }


def test_the_example_configuration_loads() -> None:
    catalog, targets = load_world(load_settings(ROOT / "config.example.yaml", environ={}))
    assert targets["house-style"] == RouteTarget("gpt-image-1.5", "openai")
    assert "gpt-image-2" in catalog


def test_catalog_overrides_reach_the_catalog() -> None:
    catalog, _ = load_world(settings(catalog={"gpt-image-1.5": {"prices": {"image_out": 30}}}))
    assert catalog["gpt-image-1.5"].prices is not None and catalog["gpt-image-1.5"].prices.image_out == 30


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"catalog": {"gpt-image-1.5": {"n": {"max": "ten"}}}}, "catalog.gpt-image-1.5.n.max: "),
        (
            {"routes": {"house": {"upstream": "openai"}}, "policies": {}, "tenants": {}},
            "routes.house: no catalog entry 'house'",
        ),
        (
            {"routes": {"house": {"upstream": "openai", "catalog": "gpt-9"}}, "policies": {}, "tenants": {}},
            "routes.house.catalog: no catalog entry 'gpt-9'",
        ),
        (
            {"policies": {"p": {"models": ["gpt-image-1.5", "dall-e-3"]}}, "tenants": {}},
            "policies.p.models: 'dall-e-3' has no route",
        ),
        (
            {"policies": {"p": {"default_model": "gpt-image-1-mini"}}, "tenants": {}},
            "policies.p.default_model: 'gpt-image-1-mini' has no route",
        ),
        (
            {"policies": {"p": {"models": ["gpt-image-2"], "default_model": "gpt-image-1.5"}}, "tenants": {}},
            "policies.p.default_model: 'gpt-image-1.5' is not one of the policy's models",
        ),
        (
            {"policies": {"p": {"qualities": ["low", "hight"]}}, "tenants": {}},
            "policies.p.qualities: 'hight' is not accepted",
        ),
        (
            {"policies": {"p": {"backgrounds": ["clear"]}}, "tenants": {}},
            "policies.p.backgrounds: 'clear' is not accepted",
        ),
        (
            {"policies": {"p": {"models": ["gpt-image-1.5"], "sizes": ["1536x864"]}}, "tenants": {}},
            "policies.p.sizes: '1536x864' is not a size any of the policy's models makes",
        ),
        (
            {
                "tenants": {
                    "team": {"policy": "standard", "keys": [HASH], "policy_overrides": {"models": ["gpt-9"]}}
                }
            },
            "tenants.team.policy_overrides.models: 'gpt-9' has no route",
        ),
    ],
)
def test_load_world_names_each_problem(sections: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_world(settings(**sections))
    assert caught.value.source == "<config>"
    assert any(line.startswith(expected) for line in caught.value.errors), caught.value.errors


def test_load_world_reports_every_problem_at_once() -> None:
    broken = settings(
        routes={"house": {"upstream": "openai"}, "gpt-image-2": {"upstream": "openai"}},
        policies={
            "p": {"models": ["nope", "gpt-image-2"], "qualities": ["hight"], "default_model": "gpt-image-1.5"}
        },
        tenants={},
    )
    with pytest.raises(ConfigError) as caught:
        load_world(broken)
    assert len(caught.value.errors) == 4, caught.value.errors


def test_arbitrary_sizes_in_a_policy_are_fine_for_gpt_image_2() -> None:
    load_world(
        settings(policies={"p": {"sizes": ["1536x864", "auto"], "models": ["gpt-image-2"]}}, tenants={})
    )


def test_explain_an_allowed_request() -> None:
    result = explain(settings(), "team", {"model": "gpt-image-1", "prompt": "a kite", "n": 1, "stream": True})
    assert result["allowed"] and result["status"] == 200 and result["code"] is None
    assert result["route"] == {
        "upstream": "digitalocean",
        "upstream_model": "openai-gpt-image-1",
        "catalog": "gpt-image-1",
    }
    assert result["forwarded_body"]["model"] == "openai-gpt-image-1"
    # the policy narrows qualities, so the omitted (auto) quality is pinned; sizes it leaves to auto
    assert [(a["param"], a["after"]) for a in result["adjustments"]] == [
        ("quality", "medium"),
        ("size", "auto"),
        ("partial_images", 1),
    ]
    assert "quality: unset -> medium (policy pin: auto within qualities)" in render(result)
    assert result["estimate"]["images"] == 1
    assert result["estimate"]["tokens"] == {
        "text_in": 6,
        "image_in": 0,
        "image_out": 1584 + 100,
        "total": 1690,
    }
    assert result["estimate"]["usd"] == "0.067390000"  # gpt-image-1: $5 and $40 per 1M tokens
    assert result["estimate"]["usd_by_bucket"] == {
        "text_in": "0.000030000",
        "image_in": "0.000000000",
        "image_out": "0.067360000",
    }
    orjson.dumps(result)  # JSON-ready as it is
    text = render(result)
    assert (
        "decision: ALLOWED, status 200" in text
        and "openai-gpt-image-1" in text
        and "usd: $0.067390000" in text
    )


def test_explain_a_denied_request() -> None:
    policies = {"standard": {"max_n": 1, "deny_prompt_patterns": ["kite"], "default_model": "gpt-image-1.5"}}
    result = explain(settings(policies=policies), "team", {"prompt": "a kite", "n": 2})
    assert not result["allowed"] and (result["status"], result["code"]) == (403, "policy_violation")
    assert [v["rule"] for v in result["violations"]] == ["deny_prompt_patterns", "max_n"]
    assert result["violations"][0]["patterns"] == ["kite"]  # the admin sees what the client does not
    assert result["forwarded_body"] is None and result["estimate"] is not None
    text = render(result)
    assert "DENIED, status 403 policy_violation" in text and "Patterns: ['kite']" in text


def test_explain_shadow_mode_and_errors() -> None:
    shadow = explain(
        settings(policies={"standard": {"mode": "shadow", "max_n": 1}}),
        "team",
        {"prompt": "x", "n": 2, "model": "gpt-image-2"},
    )
    assert shadow["allowed"] and shadow["violations"] and "shadow mode" in render(shadow)
    refused = explain(settings(), "team", {"prompt": "x", "model": "dall-e-9"})
    assert (refused["status"], refused["code"], refused["estimate"]) == (400, "model_not_found", None)
    assert "error [model]" in render(refused)
    junk: Any
    for junk in (None, [], "x", {"prompt": ["x" * 500]}):
        assert explain(settings(), "team", junk)["status"] == 400


def test_explain_takes_an_edit_with_its_files() -> None:
    request = {
        "operation": "edit",
        "body": {"model": "gpt-image-1.5", "prompt": "a kite", "quality": "low", "size": "1024x1024"},
        "files": [
            {
                "field": "image[]",
                "filename": "a.png",
                "format": "png",
                "width": 1024,
                "height": 1024,
                "bytes": 9,
            },
            {
                "field": "mask",
                "filename": "m.png",
                "format": "png",
                "width": 1024,
                "height": 1024,
                "bytes": 9,
            },
        ],
    }
    result = explain(settings(), "team", request)
    assert result["allowed"] and result["operation"] == "edit"
    assert [f["field"] for f in result["files"]] == ["image[]", "mask"]
    assert result["estimate"]["tokens"]["image_in"] == 2 * 194  # the image and the mask, one tile each
    assert "files:" in render(result) and "operation: edit" in render(result)
    mismatched = {**request, "files": [request["files"][0], {**request["files"][1], "width": 512}]}
    refused = explain(settings(), "team", mismatched)
    assert (refused["status"], refused["error"]["param"]) == (400, "mask")
