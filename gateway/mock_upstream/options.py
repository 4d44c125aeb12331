"""The mock upstream's public configuration and the record of what reached it.

`MockOptions` configures one mock app; `RECEIVED` is the app key under which the app keeps a
`ReceivedRequest` for every request it was sent, so tests can assert what the gateway forwarded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

from aiohttp import web

Flavor = Literal["openai", "digitalocean"]
_T = TypeVar("_T")


@dataclass(frozen=True)
class MockOptions:
    flavor: Flavor = "openai"
    latency_ms: float = 0.0  # delay before the response starts
    partial_interval_ms: float = 0.0  # delay between streamed events
    api_key: str | None = None  # when set, requests must carry `Authorization: Bearer <api_key>`
    image_bytes: int | None = None  # when set, each b64 payload is padded to about this many bytes
    fail_status: int | None = None  # answer generations with this error status (503, 429, ...)
    fail_rate: float = 1.0  # the share of generations that fail with `fail_status`
    retry_after: float | None = None  # the `Retry-After` seconds sent with a forced failure
    hang_ms: float = 0.0  # hold every generation this long after reading it (a read timeout's cause)
    serve_dall_e_2: bool = False  # an upstream that still serves dall-e-2 edits and variations
    # Every stream's defaults for the `x-mock-sse-error-after-events` and `x-mock-sse-done` knobs,
    # for tests that reach the mock through the gateway (which does not forward `x-mock-*` headers).
    sse_error_after_events: int | None = None
    sse_done: bool = False


class Headers(dict[str, str]):
    """Received headers: keys stored lower-case and looked up case-insensitively, like HTTP does.

    Repeated headers are joined with ", " (RFC 9110 field combination).
    """

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__()
        for name, value in items:
            key = name.lower()
            super().__setitem__(key, f"{super().__getitem__(key)}, {value}" if key in self else value)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    @overload
    def get(self, key: str, default: None = None, /) -> str | None: ...
    @overload
    def get(self, key: str, default: str, /) -> str: ...
    @overload
    def get(self, key: str, default: _T, /) -> str | _T: ...
    def get(self, key: str, default: object = None, /) -> object:
        return super().get(key.lower(), default)


@dataclass(frozen=True)
class ReceivedFile:
    """A file part of a multipart request, byte for byte."""

    name: str
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the mock received it. `body` is `{}` when `raw` is not a JSON object; for a
    multipart request it holds the text fields (as strings) and `files` the file parts, in order."""

    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes
    method: str = "POST"
    path: str = ""
    files: tuple[ReceivedFile, ...] = ()


RECEIVED: web.AppKey[list[ReceivedRequest]] = web.AppKey("mock_upstream_received", list)
OPTIONS: web.AppKey[MockOptions] = web.AppKey("mock_upstream_options", MockOptions)
