"""Which limits apply: scopes, names, user digests, shadow mode, USD in nano-USD, key names; what
the calls hand the scripts."""

from __future__ import annotations

import hashlib
import re
import struct
from datetime import date
from typing import Any

from gateway.config import KeySettings, Limits, StoreSettings, TenantSettings
from gateway.limits import LimitPlan
from gateway.limits.calls import MECHANISM_CODES, SettleCall, compile_checks, compile_settle, plan_day
from gateway.limits.keys import ledger_key, parse_ledger_key
from gateway.limits.ledger import charge_fields
from gateway.limits.scripts import RESERVE, SETTLE
from policies.cost import Cost

HASH = "sha256:" + "0" * 64


def _tenant(**kwargs: object) -> TenantSettings:
    keys = kwargs.pop("keys", [KeySettings(hash=HASH)])
    return TenantSettings(policy="p", keys=keys, **kwargs)  # type: ignore[arg-type]


def test_tenant_limits_only() -> None:
    tenant = _tenant(limits=Limits(requests_per_minute=60, usd_per_day="12.5"))
    plan = LimitPlan.build("team", tenant, tenant.keys[0], 0, "someone")
    assert [s.name for s in plan.scopes] == ["tenant"]
    values = {limit.kind.name: limit.value for limit in plan.scopes[0].limits}
    assert values == {"requests_per_minute": 60, "usd_per_day": 12_500_000_000}
    assert not plan.shadow


def test_key_and_user_scopes() -> None:
    named = KeySettings(hash=HASH, name="ci", limits=Limits(images_per_minute=5))
    anonymous = KeySettings(hash="sha256:" + "1" * 64, limits=Limits(images_per_minute=7))
    tenant = _tenant(keys=[named, anonymous], user_limits=Limits(tokens_per_day=1000), limits_mode="shadow")
    plan = LimitPlan.build("team", tenant, named, 0, "alice@example.com")
    digest = hashlib.sha256(b"alice@example.com").hexdigest()[:24]
    assert [s.name for s in plan.scopes] == ["key:ci", f"user:{digest}"]
    assert [s.kind for s in plan.scopes] == ["key", "user"]
    assert plan.shadow
    assert [s.name for s in LimitPlan.build("team", tenant, anonymous, 1, None).scopes] == ["key:1"]
    assert [s.name for s in LimitPlan.for_tenant("team", tenant).scopes] == ["key:ci", "key:1"]


def test_checks_name_keys_under_the_tenant_hash_tag() -> None:
    tenant = _tenant(
        limits=Limits(requests_per_minute=1, tokens_per_day=2, usd_per_month=3, concurrent_requests=4)
    )
    plan = LimitPlan.build("team", tenant, tenant.keys[0], 0, None)
    checks = compile_checks(
        plan, Cost(images=2, text_in_tokens=5, image_out_tokens=10, nano_usd=7), date(2026, 2, 28)
    )
    assert [(c.key, c.cost) for c in checks] == [
        ("igw:{team}:rate:tenant:rpm", 1),
        ("igw:{team}:window:tenant:tpd:2026-02-28", 15),
        ("igw:{team}:window:tenant:usd-month:2026-02", 7),
        ("igw:{team}:lease:tenant", 1),
    ]
    month = checks[2]
    assert month.window_s == 28 * 86_400 and month.end_us == 1_772_323_200 * 1_000_000
    assert month.expire_at == 1_772_323_200 + 86_400


def test_what_a_plan_shares_is_named_for_its_day_and_its_limits() -> None:
    """`plan_day` is cached per plan and day: the next day, or a plan reloaded with other limits,
    gets its own keys and reserve.lua doubles, never the ones kept."""
    tenant = _tenant(limits=Limits(requests_per_minute=60, tokens_per_day=2, usd_per_month=3))
    plan = LimitPlan.build("team", tenant, tenant.keys[0], 0, None)
    last_day = plan_day(plan, date(2026, 2, 28))
    assert last_day.ledger_key == "igw:{team}:ledger:2026-02-28"
    assert last_day.check_keys == (
        "igw:{team}:rate:tenant:rpm",
        "igw:{team}:window:tenant:tpd:2026-02-28",
        "igw:{team}:window:tenant:usd-month:2026-02",
    )
    assert [
        struct.unpack("<2d", before) + struct.unpack("<3d", after)
        for before, after in last_day.reserve_doubles
    ] == [
        (1, 60, 0, 0, 0),
        (2, 2, 1_772_323_200 * 1_000_000, 1_772_323_200 + 86_400, 0),
        (2, 3_000_000_000, 1_772_323_200 * 1_000_000, 1_772_323_200 + 86_400, 0),
    ]
    next_day = plan_day(plan, date(2026, 3, 1))
    assert next_day.ledger_key == "igw:{team}:ledger:2026-03-01"
    assert next_day.check_keys[1:] == (
        "igw:{team}:window:tenant:tpd:2026-03-01",
        "igw:{team}:window:tenant:usd-month:2026-03",
    )
    reloaded_tenant = _tenant(limits=Limits(requests_per_minute=61, tokens_per_day=2, usd_per_month=3))
    reloaded = LimitPlan.build("team", reloaded_tenant, reloaded_tenant.keys[0], 0, None)
    assert struct.unpack("<2d", plan_day(reloaded, date(2026, 2, 28)).reserve_doubles[0][0]) == (1, 61)
    assert struct.unpack("<2d", plan_day(plan, date(2026, 2, 28)).reserve_doubles[0][0]) == (1, 60)


def test_ledger_keys_round_trip_whatever_the_tenant_name() -> None:
    for tenant in ("team", "a}b", "x:ledger:y", "{t}"):
        assert parse_ledger_key(ledger_key(tenant, date(2026, 1, 2))) == (tenant, date(2026, 1, 2))
    assert parse_ledger_key("igw:{team}:rate:tenant:rpm") is None
    assert parse_ledger_key("igw:{team}:ledger:not-a-day") is None


def test_the_scripts_name_the_mechanism_codes_the_gateway_packs() -> None:
    """reserve.lua and settle.lua spell out `calls.MECHANISM_CODES` as Lua locals."""
    codes = {
        "RATE": MECHANISM_CODES["rate"],
        "CALENDAR": MECHANISM_CODES["day"],
        "LEASE": MECHANISM_CODES["lease"],
    }
    assert MECHANISM_CODES["month"] == MECHANISM_CODES["day"]
    for script in (RESERVE, SETTLE):
        names, values = re.search(
            r"^local ((?:RATE|CALENDAR|LEASE)(?:, \w+)*) = ([\d, ]+)", script.source.decode(), re.M
        ).groups()  # type: ignore[union-attr]
        for name, value in zip(names.split(", "), values.split(", "), strict=True):
            assert codes[name] == int(value), (script.name, name)


def test_a_settle_moves_the_ledger_by_each_fields_net_change() -> None:
    """settle.lua increments only the fields whose actual differs from the estimate, by the
    difference the call nets; a release (or a degraded settle) without its record moves by the
    actual alone."""
    estimate = Cost(images=1, text_in_tokens=40, image_out_tokens=4160, nano_usd=167_000_000)
    actual = Cost(images=1, text_in_tokens=38, image_out_tokens=4160, nano_usd=166_900_000)
    no_text = Cost(images=1, image_out_tokens=4160, nano_usd=166_900_000)
    unledger = charge_fields("m", estimate)

    def settle(ledger: tuple[tuple[str, int], ...], **overrides: Any) -> SettleCall:
        common = {"checks": (), "actual": actual, "settings": StoreSettings(), "unledger": unledger}
        return compile_settle("t", "r", date(2026, 1, 2), ledger=ledger, **common, **overrides)

    moved = (("text_in_tokens:m", -2), ("nano_usd:m", -100_000), ("failed:m", 1))
    assert settle(charge_fields("m", actual, "error")).ledger_moves() == (moved, moved)
    assert settle(charge_fields("m", actual)).ledger_moves() == (moved[:2], moved[:2])
    other = settle(charge_fields("m", no_text))  # no text tokens
    assert other.ledger_moves()[0] == (("nano_usd:m", -100_000), ("text_in_tokens:m", -40))
    crossed = settle(charge_fields("m", no_text, "error"))
    assert crossed.ledger_moves()[0] == (("nano_usd:m", -100_000), ("failed:m", 1), ("text_in_tokens:m", -40))
    release = settle((), unledger_if_recorded=True)
    assert release.ledger_moves() == (tuple((name, -amount) for name, amount in unledger), ())
