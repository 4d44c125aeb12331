"""End-to-end fixtures: the gateway on a real socket in front of a real upstream server on loopback."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import Settings
from gateway.front.connections import FrontRunner, Listener
from gateway.health import create_ops_app
from gateway.mock_upstream import MockOptions, create_mock_app
from tests.support.config import DO_UPSTREAM_KEY, UPSTREAM_KEY, make_settings
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.redis_servers import redis_server, redis_url  # noqa: F401


class GatewayTestServer(TestServer):
    """One of the gateway's listeners on a real socket, through the front door as `gateway serve`
    runs it: the tenant app, or the operations app (`listener="ops"`)."""

    def __init__(self, app: web.Application, *, listener: Listener = "tenant", **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.listener: Listener = listener

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return FrontRunner(self.app, listener=self.listener, **kwargs)


@dataclass
class Running:
    """A started gateway: its URL, app and metrics registry; `ops_url` serves /metrics."""

    url: str
    app: web.Application
    registry: CollectorRegistry
    server: TestServer
    ops_url: str

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


StartGateway = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_server() -> AsyncIterator[Callable[[web.Application | TestServer], Awaitable[TestServer]]]:
    servers: list[TestServer] = []

    async def start(app: web.Application | TestServer) -> TestServer:
        server = app if isinstance(app, TestServer) else TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def mock_openai(start_server: Callable[[web.Application], Awaitable[TestServer]]) -> TestServer:
    return await start_server(create_mock_app(MockOptions(flavor="openai", api_key=UPSTREAM_KEY)))


@pytest.fixture
async def mock_do(start_server: Callable[[web.Application], Awaitable[TestServer]]) -> TestServer:
    return await start_server(create_mock_app(MockOptions(flavor="digitalocean", api_key=DO_UPSTREAM_KEY)))


@pytest.fixture
async def receiver(
    start_server: Callable[[web.Application], Awaitable[TestServer]],
) -> tuple[OtlpReceiver, str]:
    """A real OTLP/HTTP receiver (tests/support/otlp_receiver.py), and its URL for `telemetry.endpoint`."""
    collector = OtlpReceiver()
    server = await start_server(collector.app())
    return collector, str(server.make_url("")).rstrip("/")


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """An address that refuses connections (an upstream or a collector that is down): a bound socket
    that never listens, held for the test so that no other process can take the port meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def base_url(server: TestServer) -> str:
    return str(server.make_url("/v1"))


@pytest.fixture
async def start_gateway(
    start_server: Callable[[web.Application], Awaitable[TestServer]],
) -> StartGateway:
    async def start(
        settings: Settings | None = None, config_path: Path | None = None, **kwargs: Any
    ) -> Running:
        if settings is None:
            settings = make_settings(**kwargs)
        registry = CollectorRegistry()
        app = create_app(settings, registry=registry, config_path=config_path)
        server = GatewayTestServer(app, host="127.0.0.1")
        await start_server(server)
        ops = await start_server(GatewayTestServer(create_ops_app(app), listener="ops", host="127.0.0.1"))
        return Running(
            url=str(server.make_url("")).rstrip("/"),
            app=app,
            registry=registry,
            server=server,
            ops_url=str(ops.make_url("")).rstrip("/"),
        )

    return start


@pytest.fixture
async def gateway(start_gateway: StartGateway, mock_openai: TestServer, mock_do: TestServer) -> Running:
    """The gateway in front of both mock upstreams, memory store, open policy."""
    return await start_gateway(openai_url=base_url(mock_openai), do_url=base_url(mock_do))
