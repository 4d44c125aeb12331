"""Properties of the engine and the estimate over generated requests and policies (hypothesis).

- `evaluate` never raises, on any JSON value or any policy, and always returns a Decision;
- a request it allows passes the catalog's own capability checks, and is a fixed point: evaluating
  the forwarded body again (enforce mode) allows it with nothing left to change;
- the mock upstream accepts what it allows and reports no more tokens than the estimate;
- the estimate is never below the catalog's token table for whatever the upstream may make of the
  forwarded body: `auto` may become any of the model's fixed sizes and concrete qualities, since the
  upstream is not bound by the policy;
- an enforced policy binds the upstream: whatever it may make of the forwarded body is a size and a
  quality the policy allows (the engine pins a narrowed `auto`), unless the policy allows no
  concrete value at all; and a body with a concrete size and quality is estimated exactly.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mock_upstream.errors import UpstreamError
from gateway.mock_upstream.models import usage as mock_usage
from gateway.mock_upstream.validation import validate as mock_validate
from policies import capabilities, sizes
from policies.cost import estimate
from policies.engine import Decision, evaluate
from policies.rules import Policy
from policies.tenant import size_allowed
from tests.unit.policies.world import CATALOG, ROUTES, UPSTREAM_IDS

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
SIZES = [
    "auto",
    "1024x1024",
    "1536x1024",
    "1024x1536",
    "256x256",
    "1792x1024",
    "1536x864",
    "3840x2160",
    "1000x1000",
]
ARBITRARY = st.builds(lambda w, h: f"{w * 16}x{h * 16}", st.integers(1, 260), st.integers(1, 260))


def values(*choices: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(choices) | st.none()


PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "model": values(*ROUTES, "dall-e-2", "dall-e-3", "gpt-image-1", "nope") | JSON,
    "prompt": st.text(max_size=40) | st.text(min_size=1000, max_size=1100) | JSON,
    "n": st.integers(-1, 12) | JSON,
    "size": values(*SIZES) | ARBITRARY | JSON,
    "quality": values("low", "medium", "high", "auto", "standard", "hd", "best"),
    "background": values("transparent", "opaque", "auto", "clear"),
    "moderation": values("low", "auto", "none"),
    "output_format": values("png", "jpeg", "webp", "gif"),
    "output_compression": st.integers(-5, 110) | st.none(),
    "stream": st.booleans() | st.none() | JSON,
    "partial_images": st.integers(-1, 5) | st.none(),
    "response_format": values("url", "b64_json"),
    "style": values("vivid", "natural"),
    "user": st.text(max_size=20) | st.just("u" * 300) | st.none(),
    "extra": JSON,
}
WILD = st.fixed_dictionaries({}, optional=PARAMS)
# mostly values a GPT image model takes, so that many requests get through to the later stages
PLAUSIBLE = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=60)},
    optional={
        "model": st.sampled_from([*ROUTES, "dall-e-2", "dall-e-3"]),
        "n": st.integers(1, 10),
        "size": st.sampled_from(["auto", "1024x1024", "1536x1024", "1024x1536"]) | ARBITRARY,
        "quality": st.sampled_from(["low", "medium", "high", "auto"]),
        "background": st.sampled_from(["opaque", "auto", "transparent"]),
        "moderation": st.sampled_from(["low", "auto"]),
        "output_format": st.sampled_from(["png", "webp", "jpeg"]),
        "output_compression": st.integers(0, 100),
        "stream": st.booleans(),
        "partial_images": st.integers(0, 3),
        "user": st.text(max_size=20),
    },
)
BODIES = WILD | PLAUSIBLE

POLICY_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "mode": st.sampled_from(["enforce", "shadow"]),
    "models": st.lists(st.sampled_from(sorted(ROUTES)), unique=True),
    "default_model": st.sampled_from(sorted(ROUTES)),
    "sizes": st.lists(
        st.sampled_from(["auto", "1024x1024", "1536x1024", "1024x1536", "1536x864"]), unique=True
    ),
    "max_pixels": st.integers(600_000, 9_000_000),
    "max_edge": st.integers(1000, 4000),
    "qualities": st.lists(st.sampled_from(["low", "medium", "high", "auto", "standard"]), unique=True),
    "max_n": st.integers(1, 10),
    "moderation": st.lists(st.sampled_from(["low", "auto"]), unique=True),
    "output_formats": st.lists(st.sampled_from(["png", "jpeg", "webp"]), unique=True),
    "backgrounds": st.lists(st.sampled_from(["auto", "opaque", "transparent"]), unique=True),
    "output_compression": st.builds(
        lambda a, b: {"min": min(a, b), "max": max(a, b)}, st.integers(0, 100), st.integers(0, 100)
    ),
    "stream": st.booleans(),
    "max_partial_images": st.integers(0, 3),
    "max_prompt_chars": st.integers(1, 2000),
    "require_user": st.booleans(),
    "deny_prompt_patterns": st.lists(st.sampled_from([r"\bcat\b", "^a", "[0-9]{3}"]), max_size=2),
    "on_violation": st.dictionaries(
        st.sampled_from(["n", "quality", "partial_images", "size"]), st.sampled_from(["reject", "clamp"])
    ),
}
POLICIES = st.fixed_dictionaries({}, optional=POLICY_FIELDS).map(Policy.model_validate)


@SETTINGS
@given(policy=POLICIES, body=JSON)
def test_evaluate_never_raises_on_any_json_value(policy: Policy, body: Any) -> None:
    assert isinstance(evaluate(policy, CATALOG, ROUTES, body), Decision)


def nested(depth: int, inner: Any, kind: str) -> Any:
    value = inner
    for _ in range(depth):
        value = [value] if kind == "array" else {"k": value}
    return value


# orjson parses up to 1,024 levels: values as deep, as wide and as long as a 1 MiB body can carry
DEEP = st.builds(nested, st.integers(1, 1023), JSON, st.sampled_from(["array", "object"]))
WIDE = st.builds(lambda n, item: [item] * n, st.integers(1000, 100_000), JSON) | st.builds(
    lambda n: {f"k{i}": i for i in range(n)}, st.integers(1000, 20_000)
)
LONG = st.builds(
    lambda n, c: c * n, st.integers(10_000, 1_000_000), st.sampled_from(["a", "é", "\n", "x\u200b"])
)
HOSTILE = DEEP | WIDE | LONG


@SETTINGS
@given(policy=POLICIES, param=st.sampled_from([*PARAMS, "prompt"]), value=HOSTILE, base=PLAUSIBLE)
def test_evaluate_never_raises_on_deep_wide_or_long_values(
    policy: Policy, param: str, value: Any, base: dict[str, Any]
) -> None:
    """Any field (or the body itself) may be 1,000 levels deep, 100,000 items wide or 1 MB long:
    evaluate decides, and the messages it builds stay short."""
    for body in ({**base, param: value}, {**base, value if isinstance(value, str) else "extra": 1}, value):
        decision = evaluate(policy, CATALOG, ROUTES, body)
        assert isinstance(decision, Decision)
        messages = [v.message for v in decision.violations]
        if decision.error is not None:
            messages.append(decision.error.message)
        assert all(len(message) < 4000 for message in messages), messages


@SETTINGS
@given(policy=POLICIES, body=BODIES)
def test_an_allowed_request_passes_the_catalogs_own_checks_and_is_a_fixed_point(
    policy: Policy, body: dict[str, Any]
) -> None:
    decision = evaluate(policy, CATALOG, ROUTES, body)
    assert isinstance(decision, Decision)
    if not decision.allowed:
        assert decision.error is not None or (decision.violations and not decision.shadow)
        return
    assert decision.model in ROUTES and decision.entry is not None
    assert decision.body["model"] == decision.model
    assert capabilities.check(decision.entry, decision.body, decision.model) is None
    # DigitalOcean's required partial image is the gateway's doing, exempt from max_partial_images: 0
    do_fill = ROUTES[decision.model].flavor == "digitalocean" and policy.max_partial_images == 0
    if policy.mode == "enforce" and not (do_fill and decision.body.get("stream") is True):
        again = evaluate(policy, CATALOG, ROUTES, decision.body)
        assert again.allowed and again.violations == () and again.adjustments == (), again


def resolutions(decision: Decision) -> list[tuple[str, str]]:
    """Every concrete (size, quality) the upstream may make of an allowed decision's forwarded body:
    a concrete value is kept; `auto` may become any fixed size or concrete quality of the model,
    whatever the policy (the upstream does not know it)."""
    entry, body = decision.entry, decision.body
    assert entry is not None
    size, quality = entry.effective(body, "size"), entry.effective(body, "quality")
    size_options = [size] if sizes.parse(size) else entry.fixed_sizes
    concrete = entry.concrete_qualities
    quality_options = [quality] if quality in concrete else concrete
    return [(s, q) for s in size_options for q in quality_options]


def allowed_decision(policy: Policy, body: dict[str, Any]) -> Decision | None:
    decision = evaluate(policy, CATALOG, ROUTES, body)
    if not decision.allowed or decision.entry is None or decision.entry.per_image:
        return None
    return decision


@SETTINGS
@given(policy=POLICIES, body=BODIES)
def test_the_estimate_is_never_below_the_token_table(policy: Policy, body: dict[str, Any]) -> None:
    decision = allowed_decision(policy, body)
    if decision is None or decision.entry is None:
        return
    entry, forwarded = decision.entry, decision.body
    cost = estimate(forwarded, entry)
    n = entry.effective(forwarded, "n")
    partials = entry.effective(forwarded, "partial_images") if forwarded.get("stream") is True else 0
    for size, quality in resolutions(decision):
        per_image = (entry.token_table or {}).get(size, {}).get(quality)
        if per_image is not None:
            assert cost.image_out_tokens >= n * (per_image + partials * entry.partial_image_tokens)
        assert cost.image_out_tokens >= n * (entry.output_tokens(size, quality) or 0)


@SETTINGS
@given(policy=POLICIES, body=BODIES)
def test_an_enforced_policy_binds_whatever_the_upstream_may_make(
    policy: Policy, body: dict[str, Any]
) -> None:
    decision = allowed_decision(policy, body)
    if decision is None or decision.entry is None or policy.mode != "enforce":
        return
    entry, model = decision.entry, decision.model
    assert model is not None
    allowed_qualities = [q for q in entry.concrete_qualities if q in (policy.qualities or [q])]
    listed = [s for s in policy.sizes or [] if sizes.parse(s)]
    makeable = [
        s for s in [*entry.fixed_sizes, *listed] if capabilities.size_problem(entry, s, model) is None
    ]
    any_size_allowed = any(size_allowed(policy, entry, s) for s in makeable)
    for size, quality in resolutions(decision):
        assert quality in allowed_qualities or not allowed_qualities, (quality, decision)
        assert size_allowed(policy, entry, size) or not any_size_allowed, (size, decision)


@SETTINGS
@given(policy=POLICIES, body=BODIES)
def test_a_concrete_size_and_quality_are_estimated_exactly(policy: Policy, body: dict[str, Any]) -> None:
    decision = allowed_decision(policy, body)
    if decision is None or decision.entry is None or len(resolutions(decision)) != 1:
        return
    [(size, quality)] = resolutions(decision)
    entry, forwarded = decision.entry, decision.body
    n = entry.effective(forwarded, "n")
    partials = entry.effective(forwarded, "partial_images") if forwarded.get("stream") is True else 0
    expected = n * ((entry.output_tokens(size, quality) or 0) + partials * entry.partial_image_tokens)
    assert estimate(forwarded, entry).image_out_tokens == expected


@SETTINGS
@given(policy=POLICIES, body=BODIES)
def test_the_mock_upstream_accepts_what_is_allowed_and_reports_no_more_than_the_estimate(
    policy: Policy, body: dict[str, Any]
) -> None:
    decision = evaluate(policy, CATALOG, ROUTES, body)
    if not decision.allowed or decision.model not in UPSTREAM_IDS or decision.entry is None:
        return
    flavor = ROUTES[decision.model].flavor
    forwarded = {**decision.body, "model": UPSTREAM_IDS[decision.model]}
    try:
        gen = mock_validate(forwarded, flavor)
    except UpstreamError as exc:
        raise AssertionError(
            f"the {flavor} mock refused an allowed request: {exc.message} {forwarded}"
        ) from exc
    reported = mock_usage(
        gen.family,
        gen.width,
        gen.height,
        gen.quality,
        n=gen.n,
        prompt=gen.prompt,
        partial_images=gen.partial_images,
    )
    cost = estimate(decision.body, decision.entry)
    assert cost.text_in_tokens >= reported["input_tokens_details"]["text_tokens"]
    assert cost.image_out_tokens >= reported["output_tokens"]


def test_a_string_too_long_to_be_a_size_is_not_parsed_nor_remembered() -> None:
    from policies import sizes

    before = sizes._parse.cache_info().currsize
    assert sizes.parse("1" * 14) is None and sizes.parse("9" * 100_000 + "x1") is None
    assert sizes._parse.cache_info().currsize == before  # a client's junk cannot fill the cache
    assert sizes.parse("999999x999999") == (999999, 999999)
