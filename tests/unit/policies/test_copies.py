"""Copies of catalog entries and policies with a field changed (`model_copy(update=...)`, as routing
gives a target its own prices) answer from the changed field: nothing memoized on the original
(defaults, output tokens, flavored variants, accepted parameters, compiled deny patterns) carries
over to the copy."""

from __future__ import annotations

from decimal import Decimal

from policies.catalog import load_catalog
from policies.cost import priced
from policies.entry import ModelEntry
from policies.rules import Policy
from policies.tenant import enforce


def used(entry: ModelEntry) -> ModelEntry:
    """`entry` after the questions a request asks of it: whatever it memoizes, it has."""
    for operation in ("generate", "edit", "variation"):
        entry.effective({}, "size", operation)
    entry.output_tokens("1024x1024", "low")
    entry.worst_output_tokens(entry.fixed_sizes, entry.concrete_qualities)
    if entry.prices is not None:
        priced(entry, 1, 10, 10, 10)
    entry.accepted_params  # noqa: B018 (a cached property, filled)
    entry.operations  # noqa: B018
    for flavor in entry.flavors:
        entry.on(flavor)
    return entry


def test_a_copy_with_a_new_token_table_counts_its_output_tokens() -> None:
    entry = used(load_catalog()["gpt-image-1.5"])
    table = {
        size: {q: tokens * 2 for q, tokens in row.items()} for size, row in (entry.token_table or {}).items()
    }
    copy = entry.model_copy(update={"token_table": table})
    assert copy.output_tokens("1024x1024", "low") == 2 * entry.output_tokens("1024x1024", "low")
    every = (entry.fixed_sizes, entry.concrete_qualities)
    assert copy.worst_output_tokens(*every) == 2 * entry.worst_output_tokens(*every)


def test_a_copy_with_new_sizes_and_qualities_lists_its_own() -> None:
    entry = used(load_catalog()["gpt-image-1.5"])
    assert len(entry.fixed_sizes) > 1 and len(entry.concrete_qualities) > 1
    copy = entry.model_copy(update={"sizes": ["auto", "1024x1024"], "qualities": ["low", "auto"]})
    assert (copy.fixed_sizes, copy.concrete_qualities) == (["1024x1024"], ["low"])


def test_a_copy_with_a_new_default_uses_it_for_an_omitted_parameter() -> None:
    entry = used(load_catalog()["gpt-image-1.5"])
    assert entry.effective({}, "size") == entry.default_size != "1536x1024"
    assert entry.model_copy(update={"default_size": "1536x1024"}).effective({}, "size") == "1536x1024"


def test_a_copy_with_new_prices_has_them_on_every_flavor() -> None:
    entry = used(load_catalog()["gpt-image-1"])
    assert entry.prices is not None and entry.flavors
    prices = entry.prices.model_copy(update={"image_out": Decimal(1)})
    copy = entry.model_copy(update={"prices": prices})
    for flavor in entry.flavors:
        assert copy.on(flavor).prices == prices


def test_a_copy_with_new_prices_charges_them() -> None:
    entry = used(load_catalog()["gpt-image-1.5"])
    assert entry.prices is not None
    assert priced(entry, 1, 0, 0, 10).nano_usd == 320_000  # $32 per 1M tokens
    cheaper = entry.prices.model_copy(update={"image_out": Decimal(1)})
    assert priced(entry.model_copy(update={"prices": cheaper}), 1, 0, 0, 10).nano_usd == 10_000


def test_a_copy_without_a_parameter_no_longer_accepts_it() -> None:
    entry = used(load_catalog()["gpt-image-1.5"])
    assert "style" not in entry.accepted_params and "background" in entry.accepted_params
    copy = entry.model_copy(update={"backgrounds": None})
    assert "background" not in copy.accepted_params


def test_a_copy_without_a_parameter_has_no_default_for_it() -> None:
    entry = used(load_catalog()["gpt-image-1.5"])
    assert entry.effective({}, "background") == "auto"
    assert entry.effective({}, "output_format", "edit") == "png"
    copy = entry.model_copy(update={"backgrounds": None, "output_formats": None})
    assert copy.effective({}, "background") is None
    assert copy.effective({}, "output_format", "edit") is None


def test_a_copy_without_edits_has_no_edit_operation() -> None:
    entry = used(load_catalog()["gpt-image-1.5"])
    assert entry.operations == ("generate", "edit")
    assert entry.model_copy(update={"edits": None}).operations == ("generate",)


def test_a_policy_copy_with_new_deny_patterns_matches_them() -> None:
    policy = Policy(deny_prompt_patterns=["forbidden"])
    assert policy.deny.first_match("a forbidden thing") == 0
    copy = policy.model_copy(update={"deny_prompt_patterns": ["other"]})
    assert copy.deny.first_match("a forbidden thing") is None
    assert copy.deny.first_match("the other one") == 0


def test_a_policy_copy_with_a_new_rule_enforces_it() -> None:
    entry = load_catalog()["gpt-image-1.5"]
    body = {"prompt": "two kites", "n": 2}
    policy = Policy()
    assert enforce(policy, entry, "gpt-image-1.5", dict(body)) == ([], [])
    copy = policy.model_copy(update={"max_n": 1})
    violations, _ = enforce(copy, entry, "gpt-image-1.5", dict(body))
    assert [v.rule for v in violations] == ["max_n"]
