"""Real Redis servers for tests: a standalone server and a local three-master Redis Cluster.

Each runs from the installed `redis-server` on free loopback ports, in a temporary directory,
without persistence (`--save "" --appendonly no`), and is stopped at the end. Never the shared
server on 6379. To use the fixtures from any test directory, import them into its conftest.py:

    from tests.support.redis_servers import redis_cluster, redis_server, redis_server_factory  # noqa: F401
    from tests.support.redis_servers import redis_url  # noqa: F401  (needs redis_server imported too)

`redis_server`, `redis_url` and `redis_cluster` are session-scoped (tests keep apart by using their own
tenant names); `redis_server_factory` gives a test servers of its own to stop and restart.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
_CLUSTER_BUS_OFFSET = 10_000
_START_TIMEOUT = 10.0


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, cluster_bus: bool = False) -> int:
    """A free loopback port; with `cluster_bus`, one whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not cluster_bus or (port + _CLUSTER_BUS_OFFSET < 65536 and _port_free(port + _CLUSTER_BUS_OFFSET)):
            return port


def _command(port: int, *args: str) -> bytes:
    """One inline command over a raw socket: enough to probe a server without a client library."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(" ".join(args).encode() + b"\r\n")
        return sock.recv(65536)


class RedisServer:
    """One redis-server process; `stop()` and `start()` again keep its port (and lose its data)."""

    def __init__(self, directory: Path, *, cluster: bool = False, port: int | None = None) -> None:
        self.directory = directory
        self.cluster = cluster
        self.port = port or free_port(cluster_bus=cluster)
        # A port picked here may be taken by someone else before redis-server binds it (tests
        # running in parallel): until the first start succeeds, another one is picked.
        self._may_move = port is None
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        argv = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--protected-mode",
            "no",
        ]
        if self.cluster:  # nodes-<port>.conf keeps its membership across a restart
            argv += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{self.port}.conf",
                "--cluster-node-timeout",
                "2000",
            ]
        return argv

    def start(self) -> RedisServer:
        for _ in range(5):
            log_path = self.directory / f"redis-{self.port}.log"
            with log_path.open("ab") as log:
                self.process = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + _START_TIMEOUT
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                with contextlib.suppress(OSError):
                    if _command(self.port, "PING").startswith(b"+PONG"):
                        self._may_move = False
                        return self
                time.sleep(0.02)
            else:
                raise RuntimeError(
                    f"redis-server on port {self.port} did not answer within {_START_TIMEOUT}s"
                )
            if not (self._may_move and b"Address already in use" in log_path.read_bytes()):
                break
            self.port = free_port(cluster_bus=self.cluster)
        raise RuntimeError(f"redis-server on port {self.port} exited; see {self.directory}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def cli(self, *args: str) -> str:
        done = subprocess.run([REDIS_CLI, "-p", str(self.port), *args], capture_output=True, check=True)
        return done.stdout.decode()


class RedisClusterNodes:
    """Three masters covering all 16384 slots, no replicas."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.nodes = [RedisServer(directory / f"node{i}", cluster=True) for i in range(size)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> RedisClusterNodes:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            check=True,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if all(b"cluster_state:ok" in _command(n.port, "CLUSTER", "INFO") for n in self.nodes):
                return self
            time.sleep(0.05)
        raise RuntimeError("the test cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _require_redis() -> None:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    _require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """The session's standalone server as a `store.url` (import it together with `redis_server`)."""
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    _require_redis()
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Standalone servers this test owns: it may stop and restart them."""
    _require_redis()
    started: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(started)}").start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
