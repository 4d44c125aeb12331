"""Who a request is made for: the end user that `require_user`, `user_limits` and traces name.

OpenAI's image API takes two fields for it (openai-python 3.63, `image_generate_params.py` and
`image_edit_params.py`): `safety_identifier`, whose "non-empty value takes precedence over the
deprecated `user` parameter", and `user`, "used when `safety_identifier` is omitted, null, or
empty". The gateway follows the same precedence, so that its end user is the upstream's. Variations
take `user` only (`image_create_variation_params.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FIELDS = ("safety_identifier", "user")  # in order of precedence


def end_user(body: Mapping[str, Any]) -> str | None:
    """The non-empty `safety_identifier`, else the non-empty `user`, else None."""
    for field in FIELDS:
        value = body.get(field)
        if isinstance(value, str) and value:
            return value
    return None
