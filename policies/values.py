"""`@value_type`: a value made once or more per request, immutable yet cheap to build.

A frozen dataclass assigns each field through `object.__setattr__` in its `__init__`: building
one costs about five times what a plain slots dataclass does (3.1 us vs 0.6 us for `Cost`'s five
fields), and a request builds several. A `@value_type` class is a plain slots dataclass at run time,
hashable by its fields as a frozen one is, and frozen to the type checker: mypy refuses any
assignment to its fields (`dataclass_transform(frozen_default=True)`), which is what keeps it
unchanged once built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def value_type(cls: type[_T]) -> type[_T]:
    return dataclass(slots=True, unsafe_hash=True)(cls)
