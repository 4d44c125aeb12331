"""The configuration contract: every failure mode names the file and the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, KeySettings, load_settings, parse_settings

HASH = "sha256:" + "a" * 64
BASE = f"""
upstreams:
  openai: {{base_url: "http://127.0.0.1:1/v1"}}
routes:
  gpt-image-1.5: {{upstream: openai}}
policies:
  p: {{default_model: gpt-image-1.5}}
tenants:
  t: {{policy: p, keys: ["{HASH}"]}}
"""


def errors_of(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "bad.yaml", environ or {})
    assert str(info.value).startswith("bad.yaml: ")
    return info.value.errors


def test_example_config_is_valid() -> None:
    settings = load_settings(Path(__file__).parents[2] / "config.example.yaml", environ={})
    assert settings.tenants["design-team"].limits.requests_per_minute == 60
    assert settings.tenants["design-team"].keys[1].name == "ci-bot"


EXAMPLE = Path(__file__).parents[2] / "config.example.yaml"


def test_the_example_switches_to_redis_with_one_variable() -> None:
    assert load_settings(EXAMPLE, environ={}).store.backend == "memory"
    redis = load_settings(EXAMPLE, environ={"GATEWAY_STORE_BACKEND": "redis", "REDIS_URL": "redis://r:1/2"})
    assert (redis.store.backend, redis.store.url) == ("redis", "redis://r:1/2")


def test_the_example_keys_are_the_published_ones() -> None:
    from gateway.front.auth import hash_key

    keys = [key.hash for key in load_settings(EXAMPLE, environ={}).tenants["design-team"].keys]
    assert keys == [hash_key("igw_example_design_team_key"), hash_key("igw_example_ci_bot_key")]


def test_every_route_of_the_example_is_usable_by_a_tenant() -> None:
    """Start-up demands a key for every routed upstream: each route must be worth it."""
    settings = load_settings(EXAMPLE, environ={})
    usable = {model for tenant in settings.tenants for model in settings.models_for(tenant)}
    assert usable == set(settings.routes)


def test_env_expansion_with_defaults_and_types() -> None:
    text = BASE + "server:\n  port: ${PORT:-9000}\n  host: ${HOST}\n"
    settings = parse_settings(text, "ok.yaml", {"HOST": "0.0.0.0"})
    assert settings.server.port == 9000 and settings.server.host == "0.0.0.0"
    assert parse_settings(text, "ok.yaml", {"HOST": "h", "PORT": "81"}).server.port == 81


def test_secrets_are_not_printed() -> None:
    settings = parse_settings(
        BASE.replace('"http://127.0.0.1:1/v1"', '"http://x/v1", api_key: sk-secret'), "s", {}
    )
    assert "sk-secret" not in repr(settings) and "sk-secret" not in str(settings.upstreams)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server: [1, 2", "not valid YAML"),
        ("- a\n- b", "the top level must be a mapping"),
        (BASE + "bogus: 1\n", "bogus: Extra inputs are not permitted"),
        (BASE + "server: {prot: 80}\n", "server.prot: Extra inputs are not permitted"),
        (BASE + "server: {port: 99999}\n", "server.port: Input should be less than or equal to 65535"),
        (
            BASE + "server: {client_write_timeout_seconds: 0}\n",
            "server.client_write_timeout_seconds: Input should be greater than 0",
        ),
        (
            BASE + "server: {max_head_bytes: 512}\n",
            "server.max_head_bytes: Input should be greater than or equal to 1024",
        ),
        (BASE + "store: {backend: mongo}\n", "store.backend: Input should be 'memory' or 'redis'"),
        (BASE + "store: {on_unavailable: maybe}\n", "store.on_unavailable:"),
        (BASE.replace('"http://127.0.0.1:1/v1"', "ftp://x"), "upstreams.openai.base_url: must be an http"),
        (
            BASE.replace("{upstream: openai}", "{upstream: azure}"),
            "routes.gpt-image-1.5.upstream: unknown upstream 'azure'",
        ),
        (BASE.replace("policy: p,", "policy: q,"), "tenants.t.policy: unknown policy 'q' (defined: p)"),
        (
            BASE.replace(HASH, "plaintext-key"),
            "tenants.t.keys.0.hash: must be sha256:<64 lowercase hex digits>",
        ),
        (BASE.replace(f'keys: ["{HASH}"]', "keys: []"), "tenants.t.keys: List should have at least 1 item"),
        (
            BASE + f'  u: {{policy: p, keys: ["{HASH}"]}}\n',
            "tenants.u.keys.0: key already belongs to tenant 't'",
        ),
        (
            BASE.replace("policy: p,", "policy: p, limits: {requests_per_minute: -1},"),
            "tenants.t.limits.requests_per_minute",
        ),
        (  # beyond what the store's Lua arithmetic keeps exact
            BASE.replace("policy: p,", "policy: p, limits: {tokens_per_minute: 150000001},"),
            "tenants.t.limits.tokens_per_minute: Input should be less than or equal to 150000000",
        ),
        (
            BASE.replace("policy: p,", "policy: p, limits: {usd_per_month: 9007199.254740993},"),
            "tenants.t.limits.usd_per_month: Input should be less than or equal to 8000000",
        ),
        (
            BASE.replace("policy: p,", "policy: p, policy_overrides: {max_n: 0},"),
            "tenants.t.policy_overrides.max_n",
        ),
        (
            BASE.replace("{default_model: gpt-image-1.5}", "{deny_prompt_patterns: ['(']}"),
            "deny_prompt_patterns: pattern #0 '(': missing ): (",
        ),
        (
            BASE.replace("{default_model: gpt-image-1.5}", "{deny_prompt_patterns: ['ok', '(a)\\1']}"),
            "deny_prompt_patterns: pattern #1 '(a)\\1': invalid escape sequence: \\1 (patterns are RE2",
        ),
        (
            BASE.replace("{default_model: gpt-image-1.5}", "{deny_prompt_patterns: ['(?!x)y']}"),
            "pattern #0 '(?!x)y': invalid perl operator: (?!",
        ),
        (
            BASE + "server: {workers: 4}\n",
            "server.workers: several worker processes need store.backend: redis",
        ),
        (
            BASE + "admin:\n  token: ${ADMIN_TOKEN}\n",
            "admin.token: environment variable ADMIN_TOKEN is not set",
        ),
        (
            BASE + "server: {upload_dir: /nonexistent/spool}\n",
            "server.upload_dir: '/nonexistent/spool' is not",
        ),
        (BASE + "server: {max_upload_bytes: 0}\n", "server.max_upload_bytes: Input should be greater than 0"),
        (
            BASE.replace('"http://127.0.0.1:1/v1"}', '"http://127.0.0.1:1/v1", operations: [paint]}'),
            "upstreams.openai.operations.0: Input should be 'generate', 'edit' or 'variation'",
        ),
        (
            BASE.replace("{default_model: gpt-image-1.5}", "{operations: [sketch]}"),
            "policies.p.operations.0: Input should be 'generate', 'edit' or 'variation'",
        ),
    ],
)
def test_each_failure_mode_has_a_clear_message(text: str, expected: str) -> None:
    assert any(expected in line for line in errors_of(text)), errors_of(text)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "missing.yaml")
    assert "missing.yaml: cannot read the file" in str(info.value)


@pytest.mark.parametrize("secret", ["s3cr3t #x", "123456", "yes", "null", "@abc-secret", "*secret"])
def test_env_values_are_taken_verbatim(secret: str) -> None:
    text = BASE + "admin:\n  token: ${ADMIN_TOKEN}\n"
    settings = parse_settings(text, "ok.yaml", {"ADMIN_TOKEN": secret})
    assert settings.admin.token.get_secret_value() == secret


# --- upstream keys: serving (and check-config) needs one for each routed upstream that requires it

OPENAI = """
upstreams:
  openai: {base_url: "https://api.openai.com/v1", api_key: "${OPENAI_API_KEY:-}"}
  spare: {base_url: "https://inference.do-ai.run/v1", api_key: "${DO_MODEL_ACCESS_KEY:-}"}
  local: {base_url: "http://127.0.0.1:9090/v1"}
routes:
  gpt-image-1.5: {upstream: openai}
  gpt-image-1: {upstream: local}
"""


def key_problems(text: str, environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "bad.yaml", environ, require_upstream_keys=True)
    return info.value.errors


@pytest.mark.parametrize("environ", [{}, {"OPENAI_API_KEY": ""}])
def test_an_unset_or_empty_upstream_key_names_its_path_and_variable(environ: dict[str, str]) -> None:
    # `spare` has no key either, but no route uses it; `local` is not a host that needs one.
    assert key_problems(OPENAI, environ) == [
        "upstreams.openai.api_key: empty (OPENAI_API_KEY unset or empty in the environment);"
        " api.openai.com refuses every request without a key"
    ]


def test_an_upstream_key_is_required_only_when_serving() -> None:
    settings = parse_settings(OPENAI, "ok.yaml", {})  # explain, tests, the library: no key needed
    assert settings.upstreams["openai"].api_key.get_secret_value() == ""
    settings = parse_settings(OPENAI, "ok.yaml", {"OPENAI_API_KEY": "sk-x"}, require_upstream_keys=True)
    assert settings.upstreams["openai"].api_key.get_secret_value() == "sk-x"


def test_the_default_upstreams_need_keys_too() -> None:
    text = "routes:\n  gpt-image-1: {upstream: digitalocean, model: openai-gpt-image-1}\n"
    assert key_problems(text, {}) == [
        "upstreams.digitalocean.api_key: empty; inference.do-ai.run refuses every request without a key"
    ]


def test_a_missing_key_is_listed_with_every_other_problem() -> None:
    errors = key_problems(OPENAI + "server: {port: -1}\n", {})
    assert [line.split(":")[0] for line in errors] == ["server.port", "upstreams.openai.api_key"]
    broken = OPENAI.replace("{upstream: local}", "{upstream: [local]}")  # reported, not a crash
    assert any(line.startswith("routes.gpt-image-1.upstream:") for line in key_problems(broken, {}))


def test_the_example_config_needs_both_upstream_keys_to_serve() -> None:
    example = Path(__file__).parents[2] / "config.example.yaml"
    with pytest.raises(ConfigError) as info:
        load_settings(example, environ={}, require_upstream_keys=True)
    assert [line.split(":")[0] for line in info.value.errors] == [
        "upstreams.openai.api_key",
        "upstreams.digitalocean.api_key",
    ]
    load_settings(example, {"OPENAI_API_KEY": "sk", "DO_MODEL_ACCESS_KEY": "do"}, require_upstream_keys=True)


def test_the_store_url_is_logged_without_its_password() -> None:
    from gateway.config import StoreSettings

    store = StoreSettings(backend="redis", url="rediss://app:s3cret@redis.internal:6380/2")
    assert store.shown_url == "rediss://app:***@redis.internal:6380/2"
    assert StoreSettings(backend="redis", url="redis://r:1/0").shown_url == "redis://r:1/0"


def test_the_models_a_tenant_may_use_are_routed_and_allowed_by_its_policy() -> None:
    text = BASE.replace(
        "gpt-image-1.5: {upstream: openai}",
        "gpt-image-1.5: {upstream: openai}\n  gpt-image-2: {upstream: openai}",
    )
    narrow = text.replace("p: {default_model: gpt-image-1.5}", "p: {models: [gpt-image-2]}")
    assert parse_settings(narrow, "s", {}).models_for("t") == ["gpt-image-2"]
    shadow = text.replace("p: {default_model: gpt-image-1.5}", "p: {models: [gpt-image-2], mode: shadow}")
    assert parse_settings(shadow, "s", {}).models_for("t") == ["gpt-image-1.5", "gpt-image-2"]  # refuses none


def test_which_store_holds_the_limits_is_logged_at_start_the_memory_store_loudly() -> None:
    from structlog.testing import capture_logs

    from gateway.process.server import _log_store

    memory = parse_settings(BASE, "s", {})
    redis = parse_settings(BASE + "store: {backend: redis, url: 'redis://u:pw@r:1/0'}\n", "s", {})
    with capture_logs() as logs:
        _log_store(memory)
        _log_store(redis)
    assert [(line["event"], line["log_level"]) for line in logs] == [
        ("store_in_memory", "warning"),
        ("store_selected", "info"),
    ]
    assert logs[1]["url"] == "redis://u:***@r:1/0"


def test_patterns_that_validate_input_match_the_whole_value() -> None:
    from policies import sizes
    from policies.rules import Policy

    assert sizes.parse("1024x1024\n") is None and sizes.parse("1024x1024") == (1024, 1024)
    with pytest.raises(ValueError, match="neither auto nor WIDTHxHEIGHT"):
        Policy(sizes=["1024x1024\n"])
    with pytest.raises(ValueError, match="sha256"):
        KeySettings(hash="sha256:" + "a" * 64 + "\n")
