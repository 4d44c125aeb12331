"""Estimates (an upper bound before the call) and actual costs (from `usage`), in integer nano-USD."""

from __future__ import annotations

from typing import Any

import pytest

from policies.catalog import load_catalog
from policies.cost import Cost, actual_cost, estimate, nano_usd_by_bucket, prompt_tokens
from policies.rules import Policy
from tests.unit.policies.world import CATALOG, decide

OPEN = Policy()


def cost_of(model: str, policy: Policy = OPEN, **body: Any) -> Cost:
    return estimate({"model": model, "prompt": "a cat", **body}, CATALOG[model])


def test_a_known_request_costs_what_the_table_and_prices_say() -> None:
    cost = cost_of("gpt-image-1.5", size="1024x1024", quality="low")
    assert cost == Cost(
        images=1, text_in_tokens=5, image_in_tokens=0, image_out_tokens=272, nano_usd=8_729_000
    )
    assert cost.usd == pytest.approx(0.008729)


@pytest.mark.parametrize(
    ("model", "size", "quality", "tokens"),
    [
        ("gpt-image-1", "1024x1024", "medium", 1056),
        ("gpt-image-1-mini", "1024x1536", "high", 6240),
        ("gpt-image-1.5", "1536x1024", "low", 400),
        ("gpt-image-2", "1024x1024", "low", 196),
        ("gpt-image-2", "1024x1024", "high", 7024),
        ("gpt-image-2", "3840x2160", "high", 13342),
    ],
)
def test_table_readings_are_estimated_exactly(model: str, size: str, quality: str, tokens: int) -> None:
    assert cost_of(model, size=size, quality=quality).image_out_tokens == tokens


def test_gpt_image_2_sizes_the_table_lacks_are_bounded_from_above() -> None:
    assert cost_of("gpt-image-2", size="1536x1024", quality="high").image_out_tokens >= 5488
    by_pixels = [
        cost_of("gpt-image-2", size=s, quality="high").image_out_tokens
        for s in ("1024x640", "1536x864", "2560x1440", "3840x2160")
    ]
    assert by_pixels == sorted(by_pixels)


NARROW = Policy(qualities=["low", "medium", "auto"], sizes=["1024x1024", "1536x1024", "auto"])
POLICIES = [
    OPEN,
    NARROW,
    Policy(qualities=["low", "auto"], sizes=["1024x1024", "auto"]),
    Policy(sizes=["auto"], qualities=["auto"]),
    Policy(mode="shadow", qualities=["low"], sizes=["1024x1024"]),
]


def test_auto_is_estimated_at_the_models_worst_case() -> None:
    # The upstream resolves auto by itself, unbound by any policy: the estimate of a body that still
    # says auto covers every size and quality of the model (the engine pins auto where a policy narrows).
    assert cost_of("gpt-image-1.5").image_out_tokens == 6240  # high, 1024x1536
    assert cost_of("gpt-image-1.5", quality="auto", size="auto").image_out_tokens == 6240
    assert cost_of("gpt-image-1.5", size="1024x1024").image_out_tokens == 4160  # high
    assert cost_of("gpt-image-1.5", quality="low").image_out_tokens == 408  # 1024x1536
    assert cost_of("gpt-image-2").image_out_tokens == 7482  # the curve at 1536x1024 high


def test_the_worst_output_tokens_are_the_largest_over_every_pairing() -> None:
    for entry in CATALOG.values():
        if entry.per_image:
            continue
        sizes, qualities = entry.fixed_sizes, entry.concrete_qualities
        pairings = [entry.output_tokens(s, q) or 0 for s in sizes for q in qualities]
        for _ in range(2):  # worked out, then remembered
            assert entry.worst_output_tokens(sizes, qualities) == max(pairings)
            assert entry.worst_output_tokens(sizes[:1], qualities[-1:]) == pairings[len(qualities) - 1]
        assert entry.worst_output_tokens([], qualities) == 0


@pytest.mark.parametrize(
    ("policy", "body", "tokens"),
    [
        (NARROW, {}, 1568),  # pinned to medium, 1536x1024: the table exactly
        (Policy(qualities=["low", "auto"]), {"size": "1024x1024"}, 272),  # once reserved at medium: 1056
        (Policy(qualities=["low", "medium", "auto"]), {}, 1584),  # medium pinned, size auto: its worst
        (Policy(sizes=["1024x1024", "auto"]), {"quality": "high"}, 4160),  # pinned to the only size
        (Policy(mode="shadow", qualities=["low", "auto"]), {}, 6240),  # nothing pinned: the worst case
    ],
)
def test_what_the_engine_forwards_is_estimated_at_what_the_upstream_may_make_of_it(
    policy: Policy, body: dict[str, Any], tokens: int
) -> None:
    decision = decide({"model": "gpt-image-1.5", "prompt": "a cat", **body}, **policy.model_dump())
    assert decision.allowed and decision.entry is not None
    assert estimate(decision.body, decision.entry).image_out_tokens == tokens


def test_an_enforced_narrowing_policy_no_longer_undershoots_an_upstream_that_picks_high() -> None:
    # `qualities: [low, medium, auto]` used to reserve medium for auto while the upstream could make
    # high; now the body says medium, so the upstream makes medium, and the estimate is its price.
    policy = Policy(qualities=["low", "medium", "auto"])
    decision = decide(
        {"model": "gpt-image-1.5", "prompt": "a cat", "size": "1024x1024"}, qualities=policy.qualities
    )
    assert decision.entry is not None and decision.body["quality"] == "medium"
    assert estimate(decision.body, decision.entry).image_out_tokens == 1056
    # and a body that still says auto (not from the engine) is reserved at high
    auto = {**decision.body, "quality": "auto"}
    assert estimate(auto, decision.entry).image_out_tokens == 4160


def test_n_and_streamed_partial_images_multiply() -> None:
    cost = cost_of("gpt-image-1.5", size="1024x1024", quality="low", n=3, stream=True, partial_images=2)
    assert (cost.images, cost.image_out_tokens) == (3, (272 + 2 * 100) * 3)
    assert cost_of("gpt-image-1.5", size="1024x1024", quality="low", partial_images=2).image_out_tokens == 272


def test_input_tokens_are_the_prompts_utf8_bytes() -> None:
    assert prompt_tokens("héllo") == 6
    assert prompt_tokens("") == 1 and prompt_tokens(None) == 1
    assert prompt_tokens("\ud800") == 3  # a lone surrogate never raises
    assert cost_of("gpt-image-1.5", prompt="猫" * 10).text_in_tokens == 30


def test_dall_e_is_priced_per_image() -> None:
    assert cost_of("dall-e-3", size="1792x1024", quality="hd") == Cost(images=1, nano_usd=120_000_000)
    assert cost_of("dall-e-3").nano_usd == 40_000_000  # 1024x1024 standard by default
    assert cost_of("dall-e-2", n=3, size="256x256") == Cost(images=3, nano_usd=48_000_000)
    assert nano_usd_by_bucket(cost_of("dall-e-2"), CATALOG["dall-e-2"]) == {"per_image": 20_000_000}


@pytest.mark.parametrize(
    ("body", "field", "expected"),
    [
        ({"n": "many"}, "images", 10),
        ({"n": 99}, "images", 10),
        ({"size": "junk", "quality": 3}, "image_out_tokens", 13342),  # the largest size, the best quality
        ({"stream": True, "partial_images": 9}, "image_out_tokens", 7482 + 3 * 100),
        ({"prompt": 5}, "text_in_tokens", 1),
    ],
)
def test_an_odd_body_is_estimated_at_the_worst_case_without_raising(
    body: dict[str, Any], field: str, expected: int
) -> None:
    assert getattr(estimate({"prompt": "x", **body}, CATALOG["gpt-image-2"]), field) == expected


FULL_USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"text_tokens": 10, "image_tokens": 2},
    "output_tokens": 4160,
    "total_tokens": 4172,
}


@pytest.mark.parametrize(
    ("usage", "tokens"),
    [
        (FULL_USAGE, (10, 2, 4160)),
        (
            {
                "input_tokens": 12,
                "total_tokens": 4172,
                "input_tokens_details": {"text_tokens": 12},
                "output_tokens": 4160,
            },
            (12, 0, 4160),
        ),
        ({"input_tokens": 12, "total_tokens": 4172}, (12, 0, 4160)),  # output from the total
        ({"output_tokens": 4160, "total_tokens": 4172}, (12, 0, 4160)),  # input from the total
        ({"output_tokens": 4160}, (5, 0, 4160)),  # input unknown: the prompt's bound
        ({"input_tokens_details": {"text_tokens": 3}, "output_tokens": 7}, (3, 0, 7)),
    ],
)
def test_actual_cost_tolerates_missing_details(usage: dict[str, Any], tokens: tuple[int, int, int]) -> None:
    cost = actual_cost({"prompt": "a cat"}, usage, 1, CATALOG["gpt-image-1.5"])
    assert cost is not None
    assert (cost.text_in_tokens, cost.image_in_tokens, cost.image_out_tokens) == tokens
    assert cost.images == 1


@pytest.mark.parametrize(
    "usage",
    [
        None,
        {},
        {"input_tokens": 5},
        {"output_tokens": "many"},
        {"output_tokens": -1},
        {"output_tokens": 10**15},  # a broken upstream: would overflow the store's exact range
        {"total_tokens": 2**63 + 5, "input_tokens": 5},
        [1, 2],
        "usage",
    ],
)
def test_no_usable_usage_means_no_actual_cost(usage: Any) -> None:
    assert actual_cost({"prompt": "x"}, usage, 1, CATALOG["gpt-image-1.5"]) is None


def test_dall_e_actual_cost_is_the_images_returned() -> None:
    body = {"prompt": "x", "size": "1024x1792", "quality": "hd"}
    assert actual_cost(body, None, 1, CATALOG["dall-e-3"]) == Cost(images=1, nano_usd=120_000_000)
    assert actual_cost(body, None, 0, CATALOG["dall-e-3"]) == Cost()


def test_estimate_and_actual_agree_to_the_nano_dollar_when_the_tokens_do() -> None:
    body = {
        "model": "gpt-image-2",
        "prompt": "a lighthouse at dusk",
        "size": "1024x1024",
        "quality": "high",
        "n": 2,
    }
    entry = CATALOG["gpt-image-2"]
    reserved = estimate(body, entry)
    usage = {
        "input_tokens": reserved.text_in_tokens,
        "input_tokens_details": {"text_tokens": reserved.text_in_tokens, "image_tokens": 0},
        "output_tokens": reserved.image_out_tokens,
    }
    assert actual_cost(body, usage, 2, entry) == reserved


def test_prices_finer_than_a_nano_dollar_are_rounded_up_once_per_bucket() -> None:
    catalog = load_catalog({"gpt-image-1.5": {"prices": {"text_in": 0.0125}}})  # 12.5 nano-USD per token
    entry = catalog["gpt-image-1.5"]
    assert entry.prices is not None and entry.prices.image_out == 32  # the other prices are kept
    cost = actual_cost({"prompt": "x"}, {"input_tokens": 3, "output_tokens": 0}, 1, entry)
    assert cost is not None and cost.nano_usd == 38  # 37.5 rounded up
