"""An answer's head and body reach a client's socket unjoined under uvloop (gateway/process/server.py
`write_unjoined`): aiohttp hands them to uvloop's `writelines` instead of copying them into one
bytes first, and the bytes the client reads are the same."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import http_writer, web

from gateway.process.server import write_unjoined

BODY = bytes(range(256)) * 256  # 64 KiB: above aiohttp's threshold for writing pieces unjoined


async def answer_read_raw() -> bytes:
    """One GET answered by an aiohttp server on a real socket, as the client's bytes."""
    app = web.Application()

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="application/json")

    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, socket.create_server(("127.0.0.1", 0)))
    await site.start()
    port = runner.addresses[0][1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = await reader.read(-1)
        writer.close()
        return received
    finally:
        await runner.cleanup()


def test_under_uvloop_aiohttp_writes_an_answers_pieces_unjoined(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.setattr(http_writer, "SKIP_WRITELINES", True)  # aiohttp's choice before 3.12.9

    async def served() -> tuple[bool, bytes]:
        return write_unjoined(), await answer_read_raw()

    unjoined, received = uvloop.run(served())
    assert unjoined and http_writer.SKIP_WRITELINES is False
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"Content-Length: 65536" in head and body == BODY


def test_on_asyncios_loop_aiohttps_choice_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_writer, "SKIP_WRITELINES", True)

    async def served() -> tuple[bool, bytes]:
        return write_unjoined(), await answer_read_raw()

    unjoined, received = asyncio.run(served())
    assert not unjoined and http_writer.SKIP_WRITELINES is True
    assert received.partition(b"\r\n\r\n")[2] == BODY
