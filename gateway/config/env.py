"""`${VAR}` and `${VAR:-default}` in a parsed YAML tree, expanded from an environment given in."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(node: Any, environ: Mapping[str, str], missing: list[str], path: str = "") -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree; a bare `${VAR}`
    that is not set becomes "" and is listed in `missing` (`key.path: ...`), so every other problem
    of the file can still be reported with it."""
    if isinstance(node, dict):
        return {
            k: expand_env(v, environ, missing, f"{path}.{k}" if path else str(k)) for k, v in node.items()
        }
    if isinstance(node, list):
        return [expand_env(v, environ, missing, f"{path}.{i}") for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        missing.append(f"{path}: environment variable {name} is not set")
        return ""

    # The value stays a string (a secret is never re-parsed as YAML); pydantic converts
    # `port: ${PORT:-8080}` to a number where the field is one.
    return ENV_REF.sub(substitute, node)
