"""Loading the configuration file: YAML, `${VAR}` expansion, validation, and every problem at once.

This is the only module that reads `os.environ`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config.env import expand_env
from gateway.config.errors import ConfigError, format_validation_error
from gateway.config.references import missing_key_problems, raw_reference_problems
from gateway.config.settings import Settings
from gateway.config.telemetry import with_environment

# Sections nothing else in the file refers to: when only they fail, the rest is checked on without them.
_STANDALONE = frozenset({"server", "store", "admin", "telemetry"})

Checks = Callable[[Settings], list[str]]


def parse_settings(
    text: str,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    *,
    require_upstream_keys: bool = False,
    checks: Checks | None = None,
) -> Settings:
    """Parse YAML text into Settings, or raise ConfigError naming `source` and each key path.

    Every problem is reported at once, as far as one depends on another: unset variables, the
    schema (types, unknown keys, references between sections), `require_upstream_keys` (serving
    and check-config: `missing_key_problems`, a well-formed file that cannot serve because a secret
    was not exported), then `checks` of the validated settings (routes, catalog and policies
    together; see gateway.routing). Those need valid `upstreams`, `routes`, `catalog`, `policies`
    and `tenants` sections: a broken `server`, `store`, `admin` or `telemetry` section does not hide
    them.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the top level must be a mapping of sections"])
    missing: list[str] = []
    environ = os.environ if environ is None else environ
    # The `telemetry:` section completed from the OTEL_* variables (gateway.config.telemetry).
    expanded, problems = with_environment(expand_env(raw, environ, missing), environ)
    unset = tuple(line.split(": ", 1)[0] for line in missing)
    problems += missing_key_problems(raw, expanded) if require_upstream_keys else []
    try:
        settings: Settings | None = Settings.model_validate(expanded)
        errors: list[str] = []
    except ValidationError as exc:
        errors = format_validation_error(exc)
        errors += [line for line in raw_reference_problems(expanded) if line not in errors]
        settings = _without_standalone_sections(expanded, exc)
    later = checks(settings) if checks is not None and settings is not None else []
    # A value left empty by an unset variable is reported once, as unset.
    reported = [line for line in errors + problems + later if not line.startswith(unset)] if unset else None
    everything = missing + (reported if reported is not None else errors + problems + later)
    if everything:
        raise ConfigError(source, everything)
    assert settings is not None  # no errors: it validated
    return settings


def _without_standalone_sections(expanded: dict[str, Any], exc: ValidationError) -> Settings | None:
    """The settings with the failing sections at their defaults, when only standalone ones failed."""
    failing = {str(error["loc"][0]) if error["loc"] else "" for error in exc.errors()}
    if not failing <= _STANDALONE:
        return None
    try:
        return Settings.model_validate({k: v for k, v in expanded.items() if k not in failing})
    except ValidationError:
        return None


def load_settings(
    path: str | Path,
    environ: Mapping[str, str] | None = None,
    *,
    require_upstream_keys: bool = False,
    checks: Checks | None = None,
) -> Settings:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(file), [f"cannot read the file: {exc.strerror}"]) from exc
    return parse_settings(
        text, str(file), environ, require_upstream_keys=require_upstream_keys, checks=checks
    )
