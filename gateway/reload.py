"""Reloading the configuration while serving: a new Runtime for new requests, or nothing at all.

In-flight requests keep the Runtime they started with. A file that does not validate is refused
with a log line and the old configuration stays. Settings that only a restart can apply (the
listening socket, the store connection, worker count, logging) are reported, not half-applied.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from gateway.logs import get_logger
from gateway.runtime import Runtime, RuntimeHolder
from gateway.settings import ConfigError, load_settings

log = get_logger("gateway.reload")

_RESTART_ONLY = ("server", "store")


class Reloader:
    def __init__(
        self, holder: RuntimeHolder, config_path: Path | None, on_reload: Callable[[Runtime], None]
    ) -> None:
        self.holder = holder
        self.config_path = config_path
        self.on_reload = on_reload
        self.supervisor_pid: int | None = None  # set in a worker: reloads reach every worker
        self.needs_restart: list[str] = []  # sections the last reload changed but could not apply

    def reload(self) -> Runtime:
        """Re-read the file and swap the runtime; raises ConfigError (old config kept) if unusable."""
        if self.config_path is None:
            raise ConfigError("<none>", ["this gateway was not started from a configuration file"])
        try:
            settings = load_settings(self.config_path, require_upstream_keys=True)
            old = self.holder.current.settings
            ignored = [name for name in _RESTART_ONLY if getattr(old, name) != getattr(settings, name)]
            # What only a restart applies is kept as it is, so nothing of it half-applies.
            kept = settings.model_copy(update={name: getattr(old, name) for name in _RESTART_ONLY})
            runtime = Runtime.build(kept)
        except ConfigError as exc:
            log.error("config_reload_failed", file=str(self.config_path), errors=exc.errors)
            raise ConfigError(str(self.config_path), exc.errors) from None
        self.needs_restart = ignored
        self.holder.replace(runtime)
        self.on_reload(runtime)
        log.info(
            "config_reloaded",
            file=str(self.config_path),
            tenants=len(runtime.settings.tenants),
            routes=len(runtime.settings.routes),
            needs_restart=ignored or None,
        )
        return runtime

    def reload_all(self) -> Runtime:
        """Reload here and, under a supervisor, in every worker (the supervisor forwards SIGHUP)."""
        runtime = self.reload()
        if self.supervisor_pid is not None:
            os.kill(self.supervisor_pid, signal.SIGHUP)
        return runtime
