"""Targets, strategy, passive health and the 429 cool-down, without sockets; and the configuration
of routes with several targets (every mistake named by its key path)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.config import ConfigError, UpstreamSettings, parse_settings
from gateway.runtime import Runtime, Target
from gateway.telemetry.metrics import Metrics
from gateway.upstreams.health import Health, cool_down_seconds
from gateway.upstreams.pools import Pools, TenantShareBusy
from gateway.upstreams.targets import covering_estimate, ordered
from policies.cost import Cost, estimate

HASH = "sha256:" + "a" * 64
HEAD = f"""
upstreams:
  openai: {{base_url: "http://127.0.0.1:1/v1"}}
  digitalocean: {{base_url: "http://127.0.0.1:2/v1"}}
policies:
  p: {{default_model: gpt-image-1.5}}
tenants:
  t: {{policy: p, keys: ["{HASH}"]}}
"""


def runtime(routes: str, catalog: str = "") -> Runtime:
    return Runtime.build(parse_settings(HEAD + routes + catalog, "ok.yaml", {}))


def errors_of(routes: str, catalog: str = "") -> list[str]:
    with pytest.raises(ConfigError) as info:
        Runtime.build(parse_settings(HEAD + routes + catalog, "bad.yaml", {}))
    return info.value.errors


WEIGHTED = """
routes:
  gpt-image-1.5:
    strategy: weighted
    targets:
      - {upstream: openai, weight: 3}
      - {upstream: digitalocean, model: openai-gpt-image-1.5}
"""


def test_weighted_spread_over_1000_requests_follows_the_weights() -> None:
    route = runtime(WEIGHTED).routes["gpt-image-1.5"]
    rng = random.Random(11)
    firsts = [ordered(route, rng)[0].upstream_name for _ in range(1000)]
    assert 700 <= firsts.count("openai") <= 800  # 750 expected
    assert all(len(ordered(route, rng)) == 2 for _ in range(10))  # the other stays as a fallback


def test_failover_keeps_the_configured_order_and_the_short_form_is_one_target() -> None:
    rt = runtime("""
routes:
  gpt-image-1.5:
    targets: [{upstream: digitalocean, model: openai-gpt-image-1.5}, {upstream: openai}]
  gpt-image-2: {upstream: openai}
""")
    route = rt.routes["gpt-image-1.5"]
    assert [t.upstream_name for t in ordered(route, random.Random())] == ["digitalocean", "openai"]
    assert [t.flavor for t in route.targets] == ["digitalocean", "openai"]
    assert [(t.upstream_name, t.upstream_model) for t in rt.routes["gpt-image-2"].targets] == [
        ("openai", "gpt-image-2")
    ]


def test_the_reservation_covers_the_costliest_target() -> None:
    rt = runtime("""
routes:
  gpt-image-1.5:
    targets:
      - {upstream: openai}
      - {upstream: digitalocean, model: openai-gpt-image-1.5, prices: {image_out: 50}}
""")
    route = rt.routes["gpt-image-1.5"]
    body = {"model": "gpt-image-1.5", "prompt": "a fox", "size": "1024x1024", "quality": "low"}
    cheap = estimate(body, rt.catalog["gpt-image-1.5"])
    covering = covering_estimate(route, body)
    assert covering.nano_usd > cheap.nano_usd
    assert covering.image_out_tokens == cheap.image_out_tokens
    assert route.targets[1].entry is not None and route.targets[1].entry.prices is not None
    assert route.targets[1].entry.prices.image_out == 50
    assert route.targets[1].entry.prices.text_in == rt.catalog["gpt-image-1.5"].prices.text_in  # type: ignore[union-attr]


def test_targets_that_price_the_same_body_alike_are_estimated_once(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = runtime(WEIGHTED)
    route = rt.routes["gpt-image-1.5"]
    priced: list[dict[str, Any]] = []

    def counted(body: dict[str, Any], *args: Any) -> Cost:
        priced.append(body)
        return estimate(body, *args)

    monkeypatch.setattr("gateway.upstreams.targets.estimate", counted)
    named = {"model": "gpt-image-1.5", "prompt": "a fox", "n": 1, "size": "1024x1536", "quality": "low"}
    assert covering_estimate(route, named) == estimate(named, rt.catalog["gpt-image-1.5"])
    assert priced == [named]  # digitalocean adds nothing to a body naming n and size
    priced.clear()
    omitted = {"model": "gpt-image-1.5", "prompt": "a fox", "quality": "low"}
    covering = covering_estimate(route, omitted)
    assert priced == [omitted, {**omitted, "n": 1, "size": "auto"}]  # its fills are priced too
    assert covering == estimate(omitted, rt.catalog["gpt-image-1.5"])


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ("routes:\n  gpt-image-1.5: {targets: []}\n", "routes.gpt-image-1.5: targets: the list is empty"),
        (
            "routes:\n  gpt-image-1.5: {targets: [{upstream: nowhere}]}\n",
            "routes.gpt-image-1.5.targets.0.upstream: unknown upstream 'nowhere'",
        ),
        (
            "routes:\n  gpt-image-1.5: {targets: [{upstream: openai, weight: 2}]}\n",
            "routes.gpt-image-1.5: a target `weight` needs `strategy: weighted`",
        ),
        (
            "routes:\n  gpt-image-1.5: {strategy: weighted, targets: [{upstream: openai, weight: 0}]}\n",
            "routes.gpt-image-1.5.targets.0.weight: Input should be greater than or equal to 1",
        ),
        (
            "routes:\n  gpt-image-1.5: {upstream: openai, targets: [{upstream: openai}]}\n",
            "routes.gpt-image-1.5: give either `upstream`/`model` or `targets`, not both",
        ),
        (
            "routes:\n  gpt-image-1.5: {targets: [{upstream: openai, catalog: nope}]}\n",
            "routes.gpt-image-1.5.targets.0.catalog: no catalog entry 'nope'",
        ),
        ("routes:\n  gpt-image-1.5: {retry_on: [500]}\n", "routes.gpt-image-1.5: give `upstream`"),
        (
            "routes:\n  gpt-image-1.5: {upstream: openai}\n  dall-e-3: {targets: [{upstream: openai, prices: {image_out: 1}}]}\n",
            "routes.dall-e-3.targets.0.prices: 'dall-e-3' is priced per image",
        ),
    ],
)
def test_route_mistakes_name_their_key_path(routes: str, expected: str) -> None:
    assert any(line.startswith(expected) for line in errors_of(routes)), errors_of(routes)


def test_a_tenant_may_not_take_a_provider_quota_name() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(
            HEAD.replace("  t: {", "  'upstream:x': {") + "routes:\n  gpt-image-1.5: {upstream: openai}\n"
        )
    assert any("may not start with 'upstream:'" in line for line in info.value.errors)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ejection_probe_and_recovery() -> None:
    clock, metrics = Clock(), Metrics(CollectorRegistry())
    health = Health(metrics, clock)
    settings = UpstreamSettings(base_url="http://x/v1", eject_after_failures=2, eject_seconds=10)
    assert health.admit("a", settings) == "ok"
    health.record("a", settings, "failure")
    assert health.admit("a", settings) == "ok"
    health.record("a", settings, "failure")
    assert health.admit("a", settings) == "ejected"
    assert metrics.registry.get_sample_value("gateway_upstream_up", {"upstream": "a"}) == 0
    clock.now += 10
    assert health.admit("a", settings) == "probe"
    assert health.admit("a", settings) == "ejected"  # one probe at a time
    health.record("a", settings, "failure")
    assert health.admit("a", settings) == "ejected"  # a failed probe ejects it again
    clock.now += 10
    assert health.admit("a", settings) == "probe"
    health.record("a", settings, "ok")
    assert health.admit("a", settings) == "ok"
    assert metrics.registry.get_sample_value("gateway_upstream_up", {"upstream": "a"}) == 1


def test_a_429_cools_down_without_ejecting() -> None:
    clock = Clock()
    health = Health(Metrics(CollectorRegistry()), clock)
    settings = UpstreamSettings(base_url="http://x/v1", eject_after_failures=1)
    health.record("a", settings, "rate_limited", cool_seconds=5)
    assert health.admit("a", settings) == "cooling"
    assert health.cool_left_ms("a") == 5000
    clock.now += 5
    assert health.admit("a", settings) == "ok"


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after": "20"}, 20.0),
        ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-requests": "20ms"}, 0.02),
        ({"x-ratelimit-reset-requests": "soon"}, 1.0),
        ({"ratelimit-reset": "1000042"}, 42.0),  # DigitalOcean: epoch seconds
        ({}, 1.0),
    ],
)
def test_cool_down_from_the_upstreams_headers(headers: dict[str, str], seconds: float) -> None:
    assert cool_down_seconds(headers, now=1_000_000.0) == pytest.approx(seconds)


async def test_a_tenants_share_is_taken_at_once_waits_bounded_when_busy_and_is_given_back_once() -> None:
    upstream = UpstreamSettings(
        base_url="http://127.0.0.1:1/v1",
        max_connections=4,
        max_connections_per_tenant=2,
        connect_timeout_seconds=0.05,
    )
    target = Target("openai", upstream, "gpt-image-1.5")
    pools = Pools()
    first, second = await pools.share(target, "t"), await pools.share(target, "t")
    other = await pools.share(target, "u")  # another tenant's share is its own
    with pytest.raises(TenantShareBusy):
        await pools.share(target, "t")
    first.release()
    first.release()  # given back once: a second release frees nothing more
    with first:  # leaving `with` after a release frees nothing either
        pass
    third = await pools.share(target, "t")
    with pytest.raises(TenantShareBusy):
        await pools.share(target, "t")
    waiting = asyncio.ensure_future(pools.share(target, "t"))  # a wait ends when one is given back
    await asyncio.sleep(0)
    with second:
        pass
    fourth = await waiting
    for share in (third, fourth, other):
        share.release()
    await pools.close()
