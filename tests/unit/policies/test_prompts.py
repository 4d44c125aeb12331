"""Deny patterns: RE2 only, on a normalised prompt."""

from __future__ import annotations

import pytest

from policies.prompts import DenyPatterns, check, normalise


@pytest.mark.parametrize(
    ("prompt", "seen"),
    [
        ("A Cat", "a cat"),
        ("ｃａｔ", "cat"),  # full-width
        ("c\u200bat", "cat"),  # zero-width space
        ("c\u200dat\ufeff", "cat"),  # zero-width joiner, BOM
        ("ca\u00adt", "cat"),  # soft hyphen
        ("\u202ecat", "cat"),  # bidi override
        ("ﬁre", "fire"),  # ligature
        ("STRASSE straße", "strasse strasse"),  # case folding
    ],
)
def test_normalise(prompt: str, seen: str) -> None:
    assert normalise(prompt) == seen


def test_the_first_matching_pattern_is_named() -> None:
    patterns = DenyPatterns([r"\bdog\b", "(a+)+$", r"\bcat\b"])
    assert patterns.first_match("a dog and a cat") == 0
    assert patterns.first_match("a CAT") == 2
    assert patterns.first_match("a" * 100_000 + "!") is None  # linear time: no backtracking
    assert DenyPatterns([]).first_match("anything") is None


@pytest.mark.parametrize("pattern", [r"(a)\1", "(?=a)", "(?<!a)b", "a++", "[", "x{2000}"])
def test_what_re2_cannot_express_is_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="RE2 syntax"):
        check(pattern)
