"""Deny patterns on prompts: compiled for a linear-time engine (RE2), matched on a normalised prompt.

Owns what `deny_prompt_patterns` can express and what a prompt looks like when they are matched:

- Patterns are RE2 syntax (https://github.com/google/re2/wiki/Syntax), matched case-insensitively
  anywhere in the prompt. RE2 runs in time linear in the prompt whatever the pattern, so no pattern
  can stall the gateway: `(a+)+$` is as cheap as `cat`. What RE2 cannot express is refused when the
  configuration loads (`check-config` says which pattern and why): backreferences (`\\1`),
  lookahead and lookbehind (`(?=`, `(?!`, `(?<=`, `(?<!`), possessive quantifiers, and patterns
  whose automaton would exceed RE2's memory budget.
- The prompt is normalised first: Unicode NFKC (full-width, ligature and other compatibility
  forms become their plain letters), format characters removed (zero-width spaces and joiners,
  soft hyphens, bidi controls: Unicode category Cf), then case-folded (`ß` becomes `ss`). So a
  pattern sees `ｃａｔ`, `c\u200bat` and `CAT` all as `cat`. Write patterns in that form: lower
  case, plain letters.
- Patterns cannot see through other disguises (homoglyphs from other scripts, spacing out
  letters, misspellings, words split over lines): they are a tripwire for policy, not a filter.
"""

from __future__ import annotations

import unicodedata

import re2

__all__ = ["DenyPatterns", "normalise"]

# Every format character (category Cf) lives in planes 0, 1 and 14: a deletion table built once.
_FORMAT = dict.fromkeys(
    cp for cp in (*range(0x20000), *range(0xE0000, 0xE0100)) if unicodedata.category(chr(cp)) == "Cf"
)


def normalise(prompt: str) -> str:
    """The prompt as deny patterns see it: NFKC, format characters removed, case-folded."""
    if prompt.isascii():
        return prompt.lower()  # ASCII is its own NFKC, has no format characters; casefold is lower
    return unicodedata.normalize("NFKC", prompt).translate(_FORMAT).casefold()


def _options() -> re2.Options:
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False  # RE2 would otherwise write its own error lines to stderr
    return options


class DenyPatterns:
    """A policy's deny patterns compiled into one RE2 set: one linear pass finds every match."""

    def __init__(self, patterns: list[str]) -> None:
        self._set = re2.Set.SearchSet(_options()) if patterns else None
        for pattern in patterns:
            check(pattern)
            assert self._set is not None
            self._set.Add(pattern)
        if self._set is not None:
            self._set.Compile()

    def first_match(self, prompt: str) -> int | None:
        """The index of the first pattern that matches the normalised prompt, or None."""
        if self._set is None:
            return None
        found = self._set.Match(normalise(prompt))
        return min(found) if found else None


def check(pattern: str) -> None:
    """Raise ValueError saying why RE2 cannot compile `pattern`."""
    try:
        re2.compile(pattern, _options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "cannot be compiled"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(f"{reason} (patterns are RE2 syntax; see the README)") from None
