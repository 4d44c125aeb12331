"""Reloading the configuration while serving: a new Runtime for new requests, or nothing at all.

In-flight requests keep the Runtime they started with. A file that does not validate is refused
with a log line and the old configuration stays. Settings that only a restart can apply (the
listening socket, the store connection, worker count, logging) are reported, not half-applied.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, load_settings
from gateway.logs import get_logger
from gateway.routing import world_problems
from gateway.runtime import Runtime, RuntimeHolder

log = get_logger("gateway.reload")

_RESTART_ONLY = ("server", "store", "telemetry")


class Reloader:
    def __init__(
        self,
        holder: RuntimeHolder,
        config_path: Path | None,
        on_reload: Callable[[Runtime], None],
        server_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.holder = holder
        self.config_path = config_path
        self.on_reload = on_reload
        # `serve --host/--port`: applied to every reading of the file, as at start, so a reload
        # does not see them as a change of the file's `server` section
        self.server_overrides = dict(server_overrides or {})
        self.supervisor_pid: int | None = None  # set in a worker: reloads reach every worker
        self.needs_restart: list[str] = []  # sections the last reload changed but could not apply

    def reload(self) -> Runtime:
        """Re-read the file and swap the runtime; raises ConfigError (old config kept) if unusable."""
        runtime, needs_restart = self._read()
        self.needs_restart = needs_restart
        self.holder.replace(runtime)
        self.on_reload(runtime)
        log.info(
            "config_reloaded",
            file=str(self.config_path),
            tenants=len(runtime.settings.tenants),
            routes=len(runtime.settings.routes),
            needs_restart=needs_restart or None,
        )
        return runtime

    def _read(self) -> tuple[Runtime, list[str]]:
        """The runtime the file describes now (restart-only sections kept as they are), and the
        sections that changed but only a restart applies; ConfigError if the file is unusable."""
        if self.config_path is None:
            raise ConfigError("<none>", ["this gateway was not started from a configuration file"])
        try:
            settings = load_settings(self.config_path, require_upstream_keys=True, checks=world_problems)
            settings = settings.with_server(self.server_overrides)
            old = self.holder.current.settings
            ignored = [name for name in _RESTART_ONLY if getattr(old, name) != getattr(settings, name)]
            # What only a restart applies is kept as it is, so nothing of it half-applies.
            kept = settings.model_copy(update={name: getattr(old, name) for name in _RESTART_ONLY})
            return Runtime.build(kept), ignored
        except ConfigError as exc:
            log.error("config_reload_failed", file=str(self.config_path), errors=exc.errors)
            raise ConfigError(str(self.config_path), exc.errors) from None

    def reload_all(self) -> tuple[Runtime, list[str]]:
        """Reload every process of the gateway once; the runtime and the restart-only sections.

        Alone, this process reloads. Under a supervisor the file is only checked here, and the
        supervisor's SIGHUP makes every worker, this one included, reload it once."""
        if self.supervisor_pid is None:
            return self.reload(), self.needs_restart
        runtime, needs_restart = self._read()
        os.kill(self.supervisor_pid, signal.SIGHUP)
        return runtime, needs_restart
