"""Configuration files for tests: one tenant with a known key, routes to given upstream URLs."""

from __future__ import annotations

from typing import Any

import yaml

from gateway.config import Settings, parse_settings
from gateway.front.auth import hash_key

TENANT_KEY = "igw_test_tenant_key_0123456789"
OTHER_KEY = "igw_test_other_key_9876543210"
UPSTREAM_KEY = "sk-test-organisation-key"
DO_UPSTREAM_KEY = "do-test-model-access-key"


def config_dict(
    openai_url: str,
    do_url: str | None = None,
    *,
    policy: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    store: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A complete config: an open policy unless `policy` says otherwise, tenant `team` with TENANT_KEY."""
    config: dict[str, Any] = {
        "upstreams": {
            "openai": {"base_url": openai_url, "api_key": UPSTREAM_KEY},
            "digitalocean": {"base_url": do_url or openai_url, "api_key": DO_UPSTREAM_KEY},
        },
        "routes": {
            "gpt-image-1.5": {"upstream": "openai"},
            "gpt-image-2": {"upstream": "openai"},
            "gpt-image-1-mini": {"upstream": "openai"},
            "gpt-image-1": {"upstream": "digitalocean", "model": "openai-gpt-image-1"},
        },
        "policies": {"open": policy if policy is not None else {"default_model": "gpt-image-1.5"}},
        "tenants": {
            "team": {"policy": "open", "keys": [hash_key(TENANT_KEY)], "limits": limits or {}},
            "other": {"policy": "open", "keys": [hash_key(OTHER_KEY)]},
        },
    }
    if store is not None:
        config["store"] = store
    for name, value in sections.items():
        config[name] = value
    return config


def make_settings(openai_url: str, do_url: str | None = None, **kwargs: Any) -> Settings:
    return parse_settings(yaml.safe_dump(config_dict(openai_url, do_url, **kwargs)), "<test>", environ={})
