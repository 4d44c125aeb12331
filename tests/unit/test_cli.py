"""The command line: check-config, serve and demo on a taken port, hash-key, new-key."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
UPSTREAM_KEYS = {"OPENAI_API_KEY": "sk-test", "DO_MODEL_ACCESS_KEY": "do-test"}


def gateway(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_check_config_accepts_the_example() -> None:
    result = gateway("check-config", "config.example.yaml", env=UPSTREAM_KEYS)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


NO_KEYS = {"OPENAI_API_KEY": "", "DO_MODEL_ACCESS_KEY": ""}
MISSING_KEYS = """configuration error in config.example.yaml:
  upstreams.openai.api_key: empty (OPENAI_API_KEY unset or empty in the environment); \
api.openai.com refuses every request without a key
  upstreams.digitalocean.api_key: empty (DO_MODEL_ACCESS_KEY unset or empty in the environment); \
inference.do-ai.run refuses every request without a key
"""


@pytest.mark.parametrize("command", [["check-config"], ["serve", "--port", "0", "--config"]])
def test_check_config_and_serve_refuse_an_empty_upstream_key(command: list[str]) -> None:
    result = gateway(*command, "config.example.yaml", env=NO_KEYS)
    assert (result.returncode, result.stderr) == (1, MISSING_KEYS)


def test_explain_sends_nothing_so_needs_no_upstream_key(tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_text('{"model": "gpt-image-1.5", "prompt": "a kite", "quality": "low"}')
    args = ["explain", "--config", "config.example.yaml", "--tenant", "design-team", str(request)]
    result = gateway(*args, env=NO_KEYS)
    assert result.returncode == 0, result.stderr


def test_check_config_lists_every_problem_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: -1}\ntenants:\n  t: {policy: nope, keys: [plain]}\n")
    result = gateway("check-config", str(bad))
    assert result.returncode == 1
    assert str(bad) in result.stderr
    for expected in ("server.port", "tenants.t.keys.0.hash", "tenants.t.policy"):
        assert expected in result.stderr
    assert "Traceback" not in result.stderr


ALL_AT_ONCE = """\
server: {port: -1}
store: {backend: redis, url: notaurl}
admin: {token: "${ADMIN_TOKEN_NOT_SET}"}
upstreams:
  openai: {base_url: "http://127.0.0.1:1/v1"}
routes:
  gpt-image-1.5: {upstream: openai}
  house: {upstream: openai, catalog: no-such-entry}
catalog:
  gpt-image-1.5: {prices: {image_out: -1}}
policies:
  p: {models: [gpt-image-1.5, not-routed], qualities: [hight]}
tenants:
  t: {policy: p, keys: ["sha256:%s"]}
""" % ("a" * 64)


def test_check_config_prints_every_stage_of_problems_at_once(tmp_path: Path) -> None:
    """An unset variable, schema errors, a store URL that is no URL, a route to no catalog entry,
    a catalog override that does not validate and policy values no model takes: one run, every
    problem (they used to come one stage per run)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(ALL_AT_ONCE)
    result = gateway("check-config", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for expected in (
        "admin.token: environment variable ADMIN_TOKEN_NOT_SET is not set",
        "server.port: Input should be greater than or equal to 0",
        "store.url: 'notaurl' must be a redis://, rediss:// or unix:// URL",
        "catalog.gpt-image-1.5.prices.image_out",
        "routes.house.catalog: no catalog entry 'no-such-entry'",
        "policies.p.models: 'not-routed' has no route",
        "policies.p.qualities: 'hight' is not accepted",
    ):
        assert expected in result.stderr, (expected, result.stderr)


def test_serve_refuses_a_store_url_that_is_no_url_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: {backend: redis, url: notaurl}\n")
    result = gateway("serve", "--port", "0", "--config", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "store.url: 'notaurl' must be a redis://, rediss:// or unix:// URL" in result.stderr


def test_hash_key_reads_stdin() -> None:
    result = gateway("hash-key", stdin="abc\n")
    assert result.stdout.strip() == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_new_key_prints_a_key_and_its_hash() -> None:
    lines = gateway("new-key").stdout.splitlines()
    key, digest = lines[0].split()[1], lines[1].split()[1]
    assert gateway("hash-key", stdin=key).stdout.strip() == digest


@pytest.mark.parametrize("command", [["serve", "--config", "config.example.yaml"], ["demo"]])
def test_a_taken_port_is_one_clear_line_and_status_1(command: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = gateway(*command, "--port", str(port), env=UPSTREAM_KEYS)
    assert result.returncode == 1
    assert result.stderr == f"gateway: cannot listen on 127.0.0.1:{port}: address already in use\n"


def test_the_demo_snippets_files_are_ignored_by_git() -> None:
    """The demo's snippets write their images where they run, often the checkout itself."""
    names = ["lighthouse.png", "lighthouse-night.png"]
    result = subprocess.run(["git", "check-ignore", *names], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.split() == names
