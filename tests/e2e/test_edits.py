"""Edits and variations end to end: the official SDK and raw multipart through the gateway to the mock.

Files must reach the upstream byte-identical, in order, with their filenames and content types; the
only changes are the announced ones. Bad uploads are OpenAI-style 4xx with nothing sent upstream and
no spooled file left open; edits share the generations' limits and are billed their input images.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image
from structlog.testing import capture_logs

from gateway.config import Settings
from gateway.mock_upstream import RECEIVED, MockOptions, create_mock_app
from gateway.mock_upstream.models import input_image_tokens
from gateway.requests.multipart import (
    HELD_BYTES,
    HELD_PER_BYTE,
    MAX_FIELDS,
    PARTS_BYTES,
    PREAMBLE_BYTES,
    READ_BYTES,
    TEXT_BYTES,
)
from gateway.requests.uploads import FilePart
from tests.e2e.conftest import Running, StartGateway, base_url
from tests.e2e.test_quotas import ADMIN_TOKEN, eventually, ledger_rows, redis_store
from tests.e2e.test_relay import StartServer, odd_chunks, scripted
from tests.support import redis_servers
from tests.support.config import OTHER_KEY, TENANT_KEY, UPSTREAM_KEY, config_dict, make_settings
from tests.support.redis_servers import RedisServer
from tests.support.scripted_upstream import Script

AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
redis_factory = redis_servers.redis_server_factory
MakeRedis = Callable[[], RedisServer]


def image_bytes(
    width: int, height: int, fmt: str = "PNG", colour: tuple[int, int, int] = (10, 80, 200)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, fmt)
    return buffer.getvalue()


def mask_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (width, height), (0, 0, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def open_spooled(directory: str | None = None) -> int:
    """Open descriptors of this process on temporary files (where spooled uploads go)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(directory or tempfile.gettempdir())
    return count


def open_spooled_files() -> int:
    return open_spooled()


def sdk(gateway: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=TENANT_KEY, max_retries=0)


def async_sdk(gateway: Running) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.v1, api_key=TENANT_KEY, max_retries=0)


@pytest.fixture
async def mock(start_server: StartServer) -> TestServer:
    return await start_server(create_mock_app(MockOptions(api_key=UPSTREAM_KEY, serve_dall_e_2=True)))


def edit_config(mock: TestServer, **kwargs: Any) -> dict[str, Any]:
    config = config_dict(base_url(mock), **kwargs)
    config["routes"]["house-edit"] = {
        "upstream": "openai",
        "model": "gpt-image-1.5",
        "catalog": "gpt-image-1.5",
    }
    return config


async def start(start_gateway: StartGateway, mock: TestServer, **kwargs: Any) -> Running:
    return await start_gateway(Settings.model_validate(edit_config(mock, **kwargs)))


# --- the SDK round trips ---------------------------------------------------------------------------


async def test_sync_sdk_edit_reaches_the_upstream_byte_identical(
    start_gateway: StartGateway, mock: TestServer
) -> None:
    gw = await start(start_gateway, mock)
    files = [
        ("first.png", image_bytes(1024, 1024), "image/png"),
        ("second.jpg", image_bytes(1920, 1080, "JPEG"), "image/jpeg"),
        ("third.webp", image_bytes(640, 480, "WEBP"), "image/webp"),
    ]
    mask = ("mask.png", mask_bytes(1024, 1024), "image/png")
    result = await asyncio.to_thread(
        sdk(gw).images.edit,
        model="house-edit",
        image=files,
        mask=mask,
        prompt="the same room, in blue",
        quality="low",
        size="1024x1024",
        input_fidelity="high",
        output_format="webp",
        output_compression=50,
        n=2,
        user="end-user-7",
    )
    assert result.data is not None and len(result.data) == 2
    received = mock.app[RECEIVED][-1]
    assert received.path == "/v1/images/edits"
    assert [(f.name, f.filename, f.content_type, f.data) for f in received.files] == [
        *(("image[]", name, kind, data) for name, data, kind in files),
        ("mask", *mask[:1], mask[2], mask[1]),
    ]
    assert received.body == {
        "prompt": "the same room, in blue",
        "model": "gpt-image-1.5",  # the route's upstream id: the only change
        "quality": "low",
        "size": "1024x1024",
        "input_fidelity": "high",
        "output_format": "webp",
        "output_compression": "50",
        "n": "2",
        "user": "end-user-7",
    }
    assert "authorization" in received.headers and TENANT_KEY not in received.headers["authorization"]
    image_in = sum(
        input_image_tokens("gpt-image-1", w, h) for w, h in ((1024, 1024), (1920, 1080), (640, 480))
    )
    assert result.usage is not None and result.usage.input_tokens_details.image_tokens == image_in + 4160


async def test_async_sdk_streamed_edit(start_gateway: StartGateway, mock: TestServer) -> None:
    gw = await start(start_gateway, mock)
    client = async_sdk(gw)
    stream = await client.images.edit(
        model="gpt-image-1.5",
        image=("photo.png", image_bytes(512, 512), "image/png"),
        prompt="add a hat",
        quality="low",
        stream=True,
        partial_images=2,
    )
    events = [event async for event in stream]
    await client.close()
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    completed = events[-1]
    assert completed.type == "image_edit.completed"
    assert completed.usage.input_tokens_details.image_tokens == input_image_tokens("gpt-image-1", 512, 512)


async def test_sync_sdk_streamed_edit_and_async_json(start_gateway: StartGateway, mock: TestServer) -> None:
    gw = await start(start_gateway, mock)
    stream = await asyncio.to_thread(
        sdk(gw).images.edit,
        model="gpt-image-2",
        image=[("a.png", image_bytes(1024, 1024), "image/png")],
        prompt="night time",
        quality="low",
        stream=True,
        partial_images=1,
    )
    events = await asyncio.to_thread(list, stream)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    client = async_sdk(gw)
    result = await client.images.edit(
        model="gpt-image-1-mini", image=("a.png", image_bytes(300, 200), "image/png"), prompt="p"
    )
    await client.close()
    assert result.data is not None and result.data[0].b64_json


async def test_raw_multipart_with_fields_after_the_files(
    start_gateway: StartGateway, mock: TestServer
) -> None:
    gw = await start(start_gateway, mock, policy={"default_model": "gpt-image-1.5", "qualities": ["low"]})
    form = aiohttp.FormData()
    form.add_field("image", image_bytes(256, 256), filename="cat.png", content_type="image/png")
    form.add_field("prompt", "a cat with a hat")
    form.add_field("quality", "high")  # outside the policy: clamped? no: rejected (no clamp configured)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gw.v1}/images/edits", data=form, headers=AUTH) as resp:
            body = await resp.json()
            assert resp.status == 403, body
            assert body["error"]["code"] == "policy_violation" and body["error"]["param"] == "quality"
        form = aiohttp.FormData()
        form.add_field("image", image_bytes(256, 256), filename="cat.png", content_type="image/png")
        form.add_field("prompt", "a cat with a hat")
        async with session.post(f"{gw.v1}/images/edits", data=form, headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
            adjusted = resp.headers["x-gateway-adjusted"]
    received = mock.app[RECEIVED][-1]
    assert [f.name for f in received.files] == ["image"]
    assert received.body["model"] == "gpt-image-1.5" and received.body["quality"] == "low"
    assert "model=unset->gpt-image-1.5" in adjusted and "quality=unset->low" in adjusted


async def test_streamed_edit_relayed_byte_for_byte(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    events = (
        b'event: image_edit.partial_image\ndata: {"type":"image_edit.partial_image","b64_json":"AAAA",'
        b'"partial_image_index":0}\n\n'
        b'event: image_edit.completed\r\ndata: {"type":"image_edit.completed","b64_json":"BBBB","usage":'
        b'{"input_tokens":200,"input_tokens_details":{"text_tokens":6,"image_tokens":194},'
        b'"output_tokens":372,"total_tokens":572}}\r\n\r\n'
    )
    upstream, server = await scripted(start_server, Script(chunks=odd_chunks(events), chunk_delay=0.001))
    gw = await start_gateway(openai_url=base_url(server))
    form = aiohttp.FormData()
    form.add_field("prompt", "hat")
    form.add_field("model", "gpt-image-1.5")
    form.add_field("stream", "true")
    form.add_field("partial_images", "1")
    form.add_field("image", image_bytes(64, 64), filename="x.png", content_type="image/png")
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(f"{gw.v1}/images/edits", data=form, headers=AUTH) as resp:
            assert resp.status == 200
            assert await resp.read() == events
    [received] = upstream.received
    assert received.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert b'name="stream"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\ntrue\r\n' in received.body


# --- refusals: nothing sent upstream ---------------------------------------------------------------


def raw_body(boundary: str, parts: list[tuple[str, bytes]]) -> bytes:
    out = b""
    for disposition, data in parts:
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


PNG = image_bytes(64, 64)
GOOD = [('form-data; name="prompt"', b"p"), ('form-data; name="image"; filename="a.png"', PNG)]
BAD: list[tuple[str, str, bytes, int, str | None]] = [
    # (name, content type, body, status, param)
    ("no boundary", "multipart/form-data", raw_body("b", GOOD), 400, None),
    ("not multipart", "application/json", b'{"prompt": "p"}', 415, None),
    ("truncated", "multipart/form-data; boundary=b", raw_body("b", GOOD)[:-30], 400, None),
    ("no name", "multipart/form-data; boundary=b", raw_body("b", [("form-data", b"x"), *GOOD]), 400, None),
    (
        "duplicate scalar",
        "multipart/form-data; boundary=b",
        raw_body("b", [('form-data; name="n"', b"1"), ('form-data; name="n"', b"2"), *GOOD]),
        400,
        "n",
    ),
    (
        "not UTF-8",
        "multipart/form-data; boundary=b",
        raw_body("b", [('form-data; name="user"', b"\xff\xfe"), *GOOD]),
        400,
        "user",
    ),
    (
        "not an image",
        "multipart/form-data; boundary=b",
        raw_body("b", [GOOD[0], ('form-data; name="image"; filename="a.png"', b"hello, not a png")]),
        400,
        "image",
    ),
    (
        "mask of another size",
        "multipart/form-data; boundary=b",
        raw_body("b", [*GOOD, ('form-data; name="mask"; filename="m.png"', mask_bytes(32, 32))]),
        400,
        "mask",
    ),
    ("no image", "multipart/form-data; boundary=b", raw_body("b", GOOD[:1]), 400, "image"),
    (
        "too many fields",
        "multipart/form-data; boundary=b",
        raw_body("b", [*GOOD, *((f'form-data; name="f{i}"', b"x") for i in range(MAX_FIELDS))]),
        400,
        None,
    ),
    (
        "more images than any model takes",
        "multipart/form-data; boundary=b",
        raw_body(
            "b", [GOOD[0], *((f'form-data; name="image[]"; filename="{i}.png"', PNG) for i in range(17))]
        ),
        400,
        "image",
    ),
]


@pytest.mark.parametrize("case", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
async def test_bad_multipart_is_an_openai_error_with_nothing_sent(
    start_gateway: StartGateway, mock: TestServer, case: tuple[str, bytes, int, str | None]
) -> None:
    content_type, body, status, param = case
    gw = await start(start_gateway, mock)
    before = open_spooled_files()
    headers = {**AUTH, "Content-Type": content_type}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gw.v1}/images/edits", data=body, headers=headers) as resp:
            error = (await resp.json())["error"]
            assert resp.status == status, error
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert mock.app[RECEIVED] == []
    assert open_spooled_files() == before


async def test_no_file_past_the_image_bound_has_its_header_read(
    start_gateway: StartGateway, mock: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images are refused while parsing, past the most any model takes: none of 40 files is looked
    at (their headers were read one after the other before, 84 ms each for a crafted PNG); 16 are."""
    described: list[str] = []
    describe = FilePart.describe

    def counted(part: FilePart) -> Any:
        described.append(part.filename)
        return describe(part)

    monkeypatch.setattr(FilePart, "describe", counted)
    gw = await start(start_gateway, mock)
    headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=b"}
    async with aiohttp.ClientSession() as session:
        for count, status in [(40, 400), (16, 200)]:
            files = [(f'form-data; name="image[]"; filename="{i}.png"', PNG) for i in range(count)]
            body = raw_body("b", [GOOD[0], ('form-data; name="model"', b"gpt-image-1.5"), *files])
            async with session.post(f"{gw.v1}/images/edits", data=body, headers=headers) as resp:
                assert resp.status == status, await resp.text()
            assert len(described) == (0 if status == 400 else 16)


async def test_the_body_budget_covers_what_unfinished_uploads_hold_in_memory(
    start_gateway: StartGateway, mock: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two uploads of 30 files, 29 of 255 KiB (16 images), not yet finished: the bytes their files
    hold in memory are within what `gateway_body_bytes_buffered` says (it said 384 KiB a request
    while every file under 256 KiB stayed in memory: 7.5 MB each here)."""
    parts: list[FilePart] = []
    init = FilePart.__post_init__

    def recorded(part: FilePart, *args: Any) -> None:
        init(part, *args)
        parts.append(part)

    monkeypatch.setattr(FilePart, "__post_init__", recorded)
    gw = await start(start_gateway, mock)
    content = b"\0" * (255 * 1024)
    files = [
        (f'form-data; name="{"image[]" if i < 16 else f"f{i}"}"; filename="{i}"', content) for i in range(30)
    ]
    files[0] = (files[0][0], content[:10_000])  # a small one, which may stay in memory
    body = raw_body("b", [GOOD[0], *files])[:-20]  # without the closing boundary: never finished
    head = (
        f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TENANT_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body) + 20}\r\n\r\n"
    ).encode()
    assert gw.server.port is not None
    writers = []
    for _ in range(2):
        _, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
        writer.write(head + body)
        writers.append(writer)

    async def all_arrived() -> bool:
        return sum(p.size for p in parts) >= 2 * 29 * len(content)

    try:
        await eventually(all_arrived)
        in_memory = sum(p.size for p in parts if not p.file._rolled)  # type: ignore[attr-defined]
        buffered = gw.metric("gateway_body_bytes_buffered")
        assert 0 < in_memory <= buffered - 2 * (TEXT_BYTES + PREAMBLE_BYTES + READ_BYTES)
    finally:
        for writer in writers:
            writer.close()


async def test_an_upload_still_arriving_takes_its_length_of_the_budget_not_more(
    start_gateway: StartGateway, mock: TestServer
) -> None:
    """An upload with a Content-Length takes from the body budget (and its tenant's share of it)
    HELD_PER_BYTE times that length where it is less than what the parser may hold: the review's small edit still arriving took
    640 KiB, and the tenant's next edit, with its 1 MiB share of 2 MiB, was refused with a 429. A
    chunked upload, whose length is unknown, still takes all of `HELD_BYTES`."""
    gw = await start(start_gateway, mock, server={"max_buffered_body_bytes": 2 * 2**20})
    body = raw_body("b", GOOD)
    assert gw.server.port is not None
    _, slow = await asyncio.open_connection("127.0.0.1", gw.server.port)
    slow.write(
        f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TENANT_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[:50]
    )
    _, chunked = await asyncio.open_connection("127.0.0.1", gw.server.port)
    chunked.write(
        f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OTHER_KEY}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + b"32\r\n"
        + body[:50]
        + b"\r\n"
    )
    try:

        async def charged() -> bool:
            expected = HELD_PER_BYTE * len(body) + PARTS_BYTES + HELD_BYTES
            return gw.metric("gateway_body_bytes_buffered") == expected

        await eventually(charged)
        headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=b"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{gw.v1}/images/edits", data=body, headers=headers) as resp,
        ):
            assert resp.status == 200, await resp.text()
    finally:
        slow.close()
        chunked.close()


async def test_an_upload_is_never_charged_more_than_the_whole_body_budget(
    start_gateway: StartGateway, mock: TestServer
) -> None:
    """A budget smaller than what an upload's parser may hold is valid (it need only hold a JSON
    body): an upload then takes all of it, one at a time, rather than wait for room that never comes."""
    gw = await start(start_gateway, mock, server={"max_body_bytes": 4096, "max_buffered_body_bytes": 8192})
    edited = await asyncio.to_thread(
        sdk(gw).images.edit, model="gpt-image-1.5", image=("a.png", PNG, "image/png"), prompt="p"
    )
    assert edited.data


def _raw_post(port: int, head: bytes, body_chunks: list[bytes]) -> tuple[bytes, int]:
    """Send a request over a raw socket piece by piece; stop sending once an answer arrives.
    Returns the answer and how many body bytes were sent."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        answer = b""
        for chunk in body_chunks:
            with contextlib.suppress(BlockingIOError):
                answer += sock.recv(65536)
            if answer:
                break
            try:
                sock.sendall(chunk)
            except (BlockingIOError, ConnectionError):
                break
            sent += len(chunk)
        sock.setblocking(True)
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    return answer, sent


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_an_upload_over_the_limit_is_413_as_soon_as_it_passes(
    start_gateway: StartGateway, mock: TestServer, declared: bool
) -> None:
    gw = await start(start_gateway, mock, server={"max_upload_bytes": 1_000_000})
    before = open_spooled_files()
    boundary = "b"
    body = raw_body(
        boundary, [GOOD[0], ('form-data; name="image"; filename="a.png"', PNG + b"\0" * 16_000_000)]
    )
    port = gw.server.port
    assert port is not None
    framing = f"Content-Length: {len(body)}" if declared else "Transfer-Encoding: chunked"
    head = (
        f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TENANT_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n{framing}\r\n\r\n"
    ).encode()
    pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    if not declared:
        pieces = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]
    answer, sent = await asyncio.to_thread(_raw_post, port, head, pieces)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"code":"request_too_large"' in answer
    assert sent < len(body) // 2, f"{sent} of {len(body)} bytes were sent before the answer"
    assert mock.app[RECEIVED] == []
    await asyncio.sleep(0.1)
    assert open_spooled_files() == before


async def test_an_edit_to_an_upstream_without_edits_is_refused(
    start_gateway: StartGateway, mock: TestServer
) -> None:
    gw = await start(start_gateway, mock)
    with pytest.raises(openai.BadRequestError) as refused:
        await asyncio.to_thread(
            sdk(gw).images.edit, model="gpt-image-1", image=("a.png", PNG, "image/png"), prompt="p"
        )
    assert refused.value.body["code"] == "unsupported_operation"  # type: ignore[index]
    assert refused.value.body["param"] == "model"  # type: ignore[index]
    assert mock.app[RECEIVED] == []


async def test_policy_operations_and_mask_rules_are_403(
    start_gateway: StartGateway, mock: TestServer
) -> None:
    policy = {"default_model": "gpt-image-1.5", "operations": ["generate", "variation"], "allow_mask": False}
    gw = await start(start_gateway, mock, policy=policy)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await asyncio.to_thread(sdk(gw).images.edit, image=("a.png", PNG, "image/png"), prompt="p")
    assert denied.value.body["param"] == "operation"  # type: ignore[index]
    assert mock.app[RECEIVED] == []


async def test_edits_and_generations_share_one_limit(start_gateway: StartGateway, mock: TestServer) -> None:
    gw = await start(start_gateway, mock, limits={"requests_per_minute": 2})
    client = async_sdk(gw)
    await client.images.generate(model="gpt-image-1.5", prompt="p", quality="low", size="1024x1024")
    await client.images.edit(
        model="gpt-image-1.5", image=("a.png", PNG, "image/png"), prompt="p", quality="low"
    )
    with pytest.raises(openai.RateLimitError):
        await client.images.edit(model="gpt-image-1.5", image=("a.png", PNG, "image/png"), prompt="p")
    with pytest.raises(openai.RateLimitError):
        await client.images.generate(model="gpt-image-1.5", prompt="p")
    await client.close()
    assert len(mock.app[RECEIVED]) == 2


async def test_variations_follow_dall_e_2s_lifecycle(start_gateway: StartGateway, mock: TestServer) -> None:
    gw = await start(start_gateway, mock)  # dall-e-2 not routed: aliased to gpt-image-1-mini, which has none
    with pytest.raises(openai.BadRequestError) as refused:
        await asyncio.to_thread(sdk(gw).images.create_variation, image=("a.png", PNG, "image/png"))
    assert refused.value.body["code"] == "unsupported_operation"  # type: ignore[index]
    config = edit_config(mock)
    config["routes"]["dall-e-2"] = {"upstream": "openai"}
    routed = await start_gateway(Settings.model_validate(config))
    result = await asyncio.to_thread(
        sdk(routed).images.create_variation,
        model="dall-e-2",
        image=("a.png", PNG, "image/png"),
        n=2,
        size="256x256",
        response_format="b64_json",
    )
    assert result.data is not None and len(result.data) == 2
    received = mock.app[RECEIVED][-1]
    assert received.path == "/v1/images/variations" and received.files[0].data == PNG
    with pytest.raises(openai.BadRequestError) as wide:
        await asyncio.to_thread(
            sdk(routed).images.create_variation,
            model="dall-e-2",
            image=("w.png", image_bytes(64, 32), "image/png"),
        )
    assert wide.value.body["param"] == "image"  # type: ignore[index]


async def test_image_input_tokens_are_settled_and_counted(gateway: Running, mock_openai: TestServer) -> None:
    settings = make_settings(base_url(mock_openai))
    assert settings.server.max_upload_bytes == 64 * 2**20
    client = async_sdk(gateway)
    result = await client.images.edit(
        model="gpt-image-1.5",
        image=("a.png", image_bytes(1024, 1536), "image/png"),
        prompt="p",
        quality="low",
    )
    await client.close()
    assert result.usage is not None
    image_in = result.usage.input_tokens_details.image_tokens
    assert image_in == input_image_tokens("gpt-image-1", 1024, 1536) > 0
    labels = {"tenant": "team", "model": "gpt-image-1.5", "bucket": "image_in", "settled": "usage"}
    assert gateway.metric("gateway_tokens_total", **labels) == image_in
    by_operation = {"tenant": "team", "model": "gpt-image-1.5", "route": "openai", "status": "200"}

    async def counted() -> bool:  # recorded once the response is finished, after the client has it
        return gateway.metric("gateway_requests_total", **by_operation, operation="edit") == 1

    await eventually(counted)
    assert gateway.metric("gateway_requests_total", **by_operation, operation="generate") == 0


@pytest.mark.parametrize("own_dir", [False, True], ids=["system-temp", "upload_dir"])
async def test_a_client_leaving_mid_upload_leaves_no_spooled_file(
    start_gateway: StartGateway, mock: TestServer, tmp_path: Path, own_dir: bool
) -> None:
    spool = str(tmp_path) if own_dir else None
    gw = await start(start_gateway, mock, server={"upload_dir": spool} if own_dir else {})

    def open_spooled_files() -> int:
        return open_spooled(spool)

    before = open_spooled_files()
    body = raw_body("b", [GOOD[0], ('form-data; name="image"; filename="a.png"', PNG + b"\0" * 3_000_000)])
    head = (
        f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TENANT_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    port = gw.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body[: len(body) // 2])  # well past the spool threshold: on disk by now
    await writer.drain()
    await asyncio.sleep(0.2)
    assert open_spooled_files() > before  # the upload is spooled to a temporary file
    writer.transport.abort()
    for _ in range(100):
        if open_spooled_files() == before:
            break
        await asyncio.sleep(0.02)
    assert open_spooled_files() == before
    assert mock.app[RECEIVED] == []
    del reader


@pytest.mark.redis
async def test_the_ledger_shows_image_input_tokens(
    start_gateway: StartGateway, mock: TestServer, redis_factory: MakeRedis
) -> None:
    gw = await start(start_gateway, mock, store=redis_store(redis_factory()), admin={"token": ADMIN_TOKEN})
    client = async_sdk(gw)
    result = await client.images.edit(
        model="gpt-image-1.5",
        image=[
            ("a.png", image_bytes(1024, 1024), "image/png"),
            ("b.png", image_bytes(600, 400), "image/png"),
        ],
        prompt="p",
        quality="low",
    )
    await client.close()
    assert result.usage is not None
    image_in = result.usage.input_tokens_details.image_tokens
    assert image_in == input_image_tokens("gpt-image-1", 1024, 1024) + input_image_tokens(
        "gpt-image-1", 600, 400
    )
    async with aiohttp.ClientSession() as session:

        async def settled() -> bool:
            rows = await ledger_rows(session, gw.url)
            return bool(rows) and rows[0]["image_in_tokens"] == image_in

        await eventually(settled)
        [row] = await ledger_rows(session, gw.url)
    assert row["requests"] == 1 and row["image_out_tokens"] == result.usage.output_tokens


async def test_the_access_log_names_the_operation_and_the_upload(
    start_gateway: StartGateway, mock: TestServer
) -> None:
    gw = await start(start_gateway, mock)
    files = [("a.png", image_bytes(64, 64), "image/png"), ("b.png", image_bytes(32, 32), "image/png")]
    with capture_logs() as logs:
        client = async_sdk(gw)
        await client.images.edit(model="gpt-image-1.5", image=files, prompt="p", quality="low")
        await client.close()

        async def logged() -> bool:
            return any(line["event"] == "request_finished" for line in logs)

        await eventually(logged)
    [line] = [line for line in logs if line["event"] == "request_finished"]
    assert line["operation"] == "edit" and line["input_images"] == 2
    assert line["upload_bytes"] == sum(len(data) for _, data, _ in files)
    assert "prompt" not in line and TENANT_KEY not in str(line)
