"""Running the real `gateway` command in a subprocess, for tests that need a separate process."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the highest resident set size the process has had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


class GatewayProcess:
    """`gateway serve --config FILE` on a free port; stopped with SIGTERM."""

    def __init__(
        self,
        config: dict[str, Any],
        directory: Path,
        env: dict[str, str] | None = None,
        *,
        checkout: Path | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        """`checkout`: another checkout of the project, run with its own .venv (an A/B bench);
        `wrapper`: a command the gateway runs under (valgrind, for a count of its instructions)."""
        self.checkout, self.wrapper = checkout, tuple(wrapper)
        self.python = str(checkout / ".venv/bin/python") if checkout else sys.executable
        self.port = free_port()
        server = {"ops_port": free_port(), **config.get("server", {}), "port": self.port}
        self.ops_port = int(server["ops_port"])
        config = {**config, "server": server}
        self.config_path = directory / f"gateway-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = directory / f"gateway-{self.port}.log"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops_url(self) -> str:
        """The operations listener: /metrics, /healthz, /readyz."""
        return f"http://127.0.0.1:{self.ops_port}"

    async def start(self, timeout: float = 20.0) -> None:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*self.wrapper, self.python, "-m", "gateway", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.checkout,  # `-m gateway` imports from the working directory first
        )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-2000:]}")
                try:
                    async with session.get(f"{self.url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"gateway did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()
