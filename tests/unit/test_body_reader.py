"""The whole-body fast path of gateway/front/body.py: a body that has arrived is read at once, and an
error the stream kept after it (the client left before its request was handled) is a ClientGone,
as on the streamed path, not a 500."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from aiohttp import streams
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry

from gateway.config import ServerSettings
from gateway.errors import ClientGone, PayloadTooLarge
from gateway.front.body import BodyBudget, BodyReader
from gateway.telemetry.metrics import Metrics


def arrived(body: bytes, error: BaseException | None = None) -> Any:
    protocol = mock.Mock(_reading_paused=False)
    payload = streams.StreamReader(protocol, 2**16, loop=mock.Mock())
    payload.feed_data(body)
    payload.feed_eof()
    if error is not None:
        payload.set_exception(error)
    return make_mocked_request(
        "POST", "/v1/images/generations", headers={"Content-Length": str(len(body))}, payload=payload
    )


def reader() -> BodyReader:
    return BodyReader(BodyBudget(2**20, Metrics(CollectorRegistry())), "team", 2**19)


async def test_a_body_that_arrived_is_read_whole() -> None:
    assert await reader().read(arrived(b'{"prompt": "a cat"}'), ServerSettings()) == b'{"prompt": "a cat"}'


async def test_a_client_gone_after_its_whole_body_is_client_gone_not_a_500() -> None:
    with pytest.raises(ClientGone):
        await reader().read(arrived(b'{"prompt": "a cat"}', ConnectionResetError()), ServerSettings())


async def test_a_whole_body_over_the_limit_is_413() -> None:
    with pytest.raises(PayloadTooLarge):
        await reader().read(arrived(b"x" * 100), ServerSettings(max_body_bytes=10))
