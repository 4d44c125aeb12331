"""Reload: what a restart alone can apply (`server`, `store`, `telemetry`) is kept as it is and reported, never half-applied."""

from __future__ import annotations

from pathlib import Path

import yaml

from gateway.config import load_settings
from gateway.front.auth import hash_key
from gateway.reload import Reloader
from gateway.runtime import Runtime, RuntimeHolder
from tests.support.config import OTHER_KEY, config_dict


def test_server_and_store_changes_wait_for_a_restart_while_the_rest_applies(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    config = config_dict("http://127.0.0.1:1/v1", server={"port": 8080, "client_write_timeout_seconds": 30})
    path.write_text(yaml.safe_dump(config))
    holder = RuntimeHolder(Runtime.build(load_settings(path)))
    reloaded: list[Runtime] = []
    reloader = Reloader(holder, path, reloaded.append)

    config["server"] = {"port": 9090, "client_write_timeout_seconds": 5}
    config["store"] = {"timeout_ms": 50}
    config["tenants"]["team"]["keys"].append(hash_key(OTHER_KEY + "-new"))
    path.write_text(yaml.safe_dump(config))
    runtime = reloader.reload()

    assert reloaded == [runtime] and holder.current is runtime
    assert reloader.needs_restart == ["server", "store"]
    assert (runtime.settings.server.port, runtime.settings.server.client_write_timeout_seconds) == (8080, 30)
    assert runtime.settings.store.timeout_ms == 250
    assert hash_key(OTHER_KEY + "-new") in runtime.credentials.by_digest  # tenants apply at once

    path.write_text(yaml.safe_dump({**config, "server": {"port": 8080, "client_write_timeout_seconds": 30}}))
    reloader.reload()
    assert reloader.needs_restart == ["store"]


def test_a_command_line_host_or_port_is_not_a_change_of_the_file(tmp_path: Path) -> None:
    """`serve --port P --host H`: the file never changes, and a reload must say nothing needs a restart."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config_dict("http://127.0.0.1:1/v1", server={"port": 8080})))
    overrides = {"port": 18080, "host": "0.0.0.0"}
    holder = RuntimeHolder(Runtime.build(load_settings(path).with_server(overrides)))
    reloader = Reloader(holder, path, lambda _: None, overrides)
    runtime = reloader.reload()
    assert reloader.needs_restart == []
    assert (runtime.settings.server.port, runtime.settings.server.host) == (18080, "0.0.0.0")


def test_a_telemetry_change_waits_for_a_restart(tmp_path: Path) -> None:
    """The tracer provider and its export thread are built once per process."""
    path = tmp_path / "gateway.yaml"
    config = config_dict("http://127.0.0.1:1/v1")
    path.write_text(yaml.safe_dump(config))
    reloader = Reloader(RuntimeHolder(Runtime.build(load_settings(path))), path, lambda _: None)
    path.write_text(yaml.safe_dump({**config, "telemetry": {"endpoint": "http://collector:4318"}}))
    runtime = reloader.reload()
    assert reloader.needs_restart == ["telemetry"]
    assert not runtime.settings.telemetry.active
