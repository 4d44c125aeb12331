"""Raw HTTP/1.1 over a socket, for requests an HTTP library refuses to send (bad bytes, bad framing)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names; the last value of a repeated header
    body: bytes
    closed: bool  # the server closed the connection after this response

    def json(self) -> dict[str, object]:
        value = orjson.loads(self.body)
        assert isinstance(value, dict)
        return value


async def read_response(reader: asyncio.StreamReader, timeout: float = 10.0) -> RawResponse:
    """One response (Content-Length or chunked) from `reader`."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")
            body = b"".join(parts)
        else:
            body = await reader.read()
        closed = headers.get("connection", "").lower() == "close"
    return RawResponse(status, headers, body, closed)


async def exchange(port: int, data: bytes, *, timeout: float = 10.0, host: str = "127.0.0.1") -> RawResponse:
    """Send `data` as it is on a fresh connection and read one response."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_response(reader, timeout)
    finally:
        writer.close()


def request(
    path: str,
    *,
    method: str = "POST",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    content_length: bool = True,
) -> bytes:
    """A request's bytes; header names and values are sent exactly as given."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: gateway"]
    lines += [name + b": " + value for name, value in headers or []]
    if content_length and body:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
