"""Every metric the Grafana dashboard and the alert rules query exists in the gateway's exposition.

A query naming a metric the gateway does not export (a typo, a rename, a missing `_total`) shows an
empty panel or an alert that can never fire, silently. This test reads the PromQL of
deploy/grafana/dashboards/gateway.json and deploy/prometheus/alerts.yml, and checks each
`gateway_*` name against the exposition text: `_bucket`/`_count`/`_sum` must belong to a histogram,
`_total` to a counter, anything else must be a gauge; and the labels a query selects or groups by
must be labels of the metrics it queries.

The exposition comes from the `exposition_text` fixture: `/metrics` of a live gateway after real
traffic (successes, streams, rejections of every kind).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway.health import METRICS
from gateway.limits.limiter import DECISION_METRICS_FLUSH_SECONDS
from tests.e2e.conftest import StartGateway, base_url
from tests.support.config import TENANT_KEY

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

# Labels Prometheus adds at scrape time (and the relabelling in deploy/README.md).
TARGET_LABELS = {"job", "instance", "pod", "namespace", "deployment"}

# Metrics the deploy assets already query but the gateway does not export yet, with what they are.
# When one is exported, test_pending_metrics_are_still_missing fails: remove it from here.
PENDING: dict[str, str] = {}

_NAME = re.compile(r"\bgateway_[a-z_]+\b")
_SELECTOR = re.compile(r"\b(gateway_[a-z_]+)\s*(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*(gateway_[a-z_]+)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)")


@dataclass
class Family:
    type: str
    labels: dict[str, set[str]] = field(default_factory=dict)  # sample name -> label names


@dataclass(frozen=True)
class Query:
    where: str
    expr: str


@pytest.fixture
async def exposition_text(start_gateway: StartGateway, mock_openai: TestServer) -> str:
    """GET /metrics of a live gateway after real traffic: successes (JSON and SSE), a bad key, a
    policy denial, a rate-limit rejection and an upstream error."""
    policy = {"default_model": "gpt-image-1.5", "max_n": 1}
    gateway = await start_gateway(
        openai_url=base_url(mock_openai), policy=policy, limits={"requests_per_minute": 5, "usd_per_day": 10}
    )
    url, good = (
        f"{gateway.v1}/images/generations",
        {"model": "gpt-image-1.5", "prompt": "x", "quality": "low"},
    )
    auth = {"Authorization": f"Bearer {TENANT_KEY}"}
    async with aiohttp.ClientSession() as session:
        sent = [
            (good, auth),
            ({**good, "stream": True, "partial_images": 1}, auth),
            (good, {}),
            ({**good, "n": 2}, auth),
            ({**good, "size": "7x7"}, auth),
            *[(good, auth)] * 4,
        ]
        for payload, headers in sent:
            async with session.post(url, json=payload, headers=headers) as resp:
                await resp.read()
        async with session.get(f"{gateway.ops_url}/metrics") as resp:
            return await resp.text()


def parse_exposition(text: str) -> dict[str, Family]:
    families: dict[str, Family] = {}
    for parsed in text_string_to_metric_families(text):
        family = families.setdefault(parsed.name, Family(parsed.type))
        for sample in parsed.samples:
            family.labels.setdefault(sample.name, set()).update(sample.labels)
    return families


def queries() -> list[Query]:
    board = json.loads((DEPLOY / "grafana/dashboards/gateway.json").read_text(encoding="utf-8"))
    found = [
        Query(f"dashboard panel {panel['title']!r}", target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]
    found += [
        Query(f"dashboard variable ${variable['name']}", str(variable.get("definition", "")))
        for variable in board["templating"]["list"]
    ]
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text(encoding="utf-8"))
    found += [
        Query(f"alert {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]
    return found


def resolve(name: str, families: dict[str, Family]) -> str | None:
    """The family a queried series name belongs to, or None when the exposition has no such series."""
    for suffix, kind in (("_bucket", "histogram"), ("_count", "histogram"), ("_sum", "histogram")):
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and base in families and families[base].type == kind:
            return base
    base = name.removesuffix("_total")
    if name.endswith("_total") and base in families and families[base].type == "counter":
        return base
    if name in families and families[name].type in {"gauge", "unknown"}:
        return name
    return None


def labels_of(name: str, families: dict[str, Family]) -> set[str] | None:
    """Label names of the series `name`, or None when nothing tells (no sample)."""
    base = resolve(name, families)
    if base is None:
        return None
    return families[base].labels.get(name)


def test_exposition_fixture_has_every_metric(exposition_text: str) -> None:
    families = parse_exposition(exposition_text)
    assert len([n for n in families if n.startswith("gateway_")]) >= 20
    for name in ("gateway_requests", "gateway_tokens", "gateway_spend_usd", "gateway_ratelimit_decisions"):
        assert families[name].labels, f"{name} has no sample after real traffic"


def test_every_queried_metric_is_exported(exposition_text: str) -> None:
    families = parse_exposition(exposition_text)
    missing: dict[str, list[str]] = {}
    for query in queries():
        for name in _NAME.findall(query.expr):
            if resolve(name, families) is None and name not in PENDING:
                missing.setdefault(name, []).append(query.where)
    assert not missing, "queried but not exported:\n" + "\n".join(
        f"  {name}: {', '.join(sorted(set(where)))}" for name, where in sorted(missing.items())
    )


def test_queried_labels_exist_on_the_metrics(exposition_text: str) -> None:
    families = parse_exposition(exposition_text)
    problems = []
    for query in queries():
        expression_labels: set[str] = set(TARGET_LABELS)
        complete = True  # every metric of the expression has samples that show its labels
        for match in _SELECTOR.finditer(query.expr):
            name, matchers = match.group(1), match.group(2) or ""
            known = labels_of(name, families)
            if known is None:  # unknown or pending names are test_every_queried_metric_is_exported's;
                complete = False  # a live scrape shows no labels for metrics without samples yet
                continue
            expression_labels |= known
            for label in set(_MATCHER.findall(matchers)) - known - TARGET_LABELS:
                problems.append(f"{query.where}: {name} has no label {label!r}")
        for name, label in _LABEL_VALUES.findall(query.expr):
            known = labels_of(name, families)
            if known is not None and label not in known:
                problems.append(f"{query.where}: {name} has no label {label!r}")
        for grouping in _GROUPING.findall(query.expr) if complete else []:
            for label in {part.strip() for part in grouping.split(",") if part.strip()}:
                if label not in expression_labels:
                    problems.append(f"{query.where}: grouping by {label!r}, which no queried metric has")
    assert not problems, "\n".join(sorted(set(problems)))


def test_pending_metrics_are_still_missing(exposition_text: str) -> None:
    families = parse_exposition(exposition_text)
    exported = [name for name in PENDING if resolve(name, families) is not None]
    assert not exported, f"{exported} are exported now: remove them from PENDING in {Path(__file__).name}"
    queried = {name for query in queries() for name in _NAME.findall(query.expr)}
    assert set(PENDING) <= queried, "a pending metric nothing queries: remove it from PENDING"


def test_the_check_catches_a_misspelt_metric(exposition_text: str) -> None:
    families = parse_exposition(exposition_text)
    assert resolve("gateway_requests_total", families) == "gateway_requests"
    assert resolve("gateway_request_duration_seconds_bucket", families) == "gateway_request_duration_seconds"
    assert resolve("gateway_store_up", families) == "gateway_store_up"
    assert resolve("gateway_requests", families) is None  # a counter is queried with _total
    assert resolve("gateway_store_up_total", families) is None  # a gauge has no _total
    assert resolve("gateway_request_duration_seconds", families) is None  # a histogram has no bare series
    assert resolve("gateway_request_total", families) is None


async def test_charges_reach_the_metric_values_without_a_scrape(
    start_gateway: StartGateway, mock_openai: TestServer
) -> None:
    """What a settled request charged is counted in the pipeline's own dicts first. With workers a
    scrape reads every worker's metric files, not this process's registry: the counts get there by
    themselves within DECISION_METRICS_FLUSH_SECONDS."""
    gateway = await start_gateway(openai_url=base_url(mock_openai))
    metrics = gateway.app[METRICS]
    labels = ("team", "gpt-image-1.5")
    async with aiohttp.ClientSession() as session:
        payload = {"model": "gpt-image-1.5", "prompt": "x", "quality": "low", "size": "1024x1024"}
        url, auth = f"{gateway.v1}/images/generations", {"Authorization": f"Bearer {TENANT_KEY}"}
        async with session.post(url, json=payload, headers=auth) as resp:
            assert resp.status == 200
            await resp.read()
    await asyncio.sleep(DECISION_METRICS_FLUSH_SECONDS + 0.5)
    assert metrics.tokens.labels(*labels, "image_out", "usage")._value.get() > 0
    assert metrics.images.labels(*labels, "1024x1024", "low", "usage")._value.get() == 1
    assert metrics.spend.counter.labels(*labels, "usage")._value.get() > 0
    assert sum(bucket.get() for bucket in metrics.reservation_drift.labels(*labels)._buckets) == 1
