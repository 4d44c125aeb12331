"""The base of the policies' models: frozen, unknown keys are errors (a typo in the catalog or a
policy fails loudly), and what a model memoizes never outlives the fields it was derived from.

A model memoizes with `functools.cached_property`, which keeps the value in the instance's
`__dict__` beside the fields. pydantic's `model_copy` copies that `__dict__`, then applies its
`update` without validation: a copy with a changed field would answer from the original's memo.
`Frozen.model_copy` leaves every memo behind, so the copy derives its own from its own fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache, cached_property
from typing import Any, Self

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """pydantic's copy, without the memos (see the module)."""
        copy = super().model_copy(update=update, deep=deep)
        for name in _memos(type(copy)):
            copy.__dict__.pop(name, None)
        return copy


@cache
def _memos(model: type[BaseModel]) -> frozenset[str]:
    """The names of `model`'s cached properties, its bases' included."""
    return frozenset(
        name
        for klass in model.__mro__
        for name, value in vars(klass).items()
        if isinstance(value, cached_property)
    )
