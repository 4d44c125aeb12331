"""The streaming multipart parser: parts byte for byte whatever the read sizes, and clear 400s/413s."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.requests.multipart import MAX_FIELDS, TEXT_BYTES, _Parser
from gateway.requests.uploads import SPOOL_BYTES, FilePart, TextPart, Upload
from policies.catalog import load_catalog


class Pieces:
    """A request body arriving in pieces of `size` bytes."""

    def __init__(self, body: bytes, size: int) -> None:
        self.pieces = [body[i : i + size] for i in range(0, len(body), size)]

    async def readany(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


async def parse(
    body: bytes, size: int = 7, limit: int = 10**9, boundary: bytes = b"XyZ", reader: Pieces | None = None
) -> Upload:
    upload = Upload()
    content = reader or Pieces(body, size)
    await _Parser(content, limit, boundary, upload, most_images=16).run()  # type: ignore[arg-type]
    return upload


def summary(upload: Upload) -> list[Any]:
    out: list[Any] = []
    for part in upload.parts:
        if isinstance(part, FilePart):
            part.file.seek(0)
            out.append((part.name, part.filename, part.content_type, part.file.read()))
        else:
            assert isinstance(part, TextPart)
            out.append((part.name, part.raw, part.value))
    return out


BODY = (
    b"preamble to ignore\r\n"
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="n"\r\n\r\n'
    b"2\r\n"
    b"--XyZ  \r\n"  # transport padding
    b'Content-Disposition: form-data; name="image[]"; filename="a \\"b\\".png"\r\n'
    b"Content-Type: image/png\r\n\r\n"
    b"\x89PNG\r\n--XyNotTheBoundary\r\n\r\n"
    b"\r\n--XyZ\r\n"
    b'Content-Disposition: form-data; name="image[]"; filename="x"; filename*=UTF-8\'\'%E2%82%AC.png\r\n\r\n'
    b"\r\n"
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="stream"\r\n\r\n'
    b"true\r\n"
    b"--XyZ--\r\nepilogue"
)


@pytest.mark.parametrize("size", [1, 2, 5, 7, 64, 100_000])
async def test_parts_come_out_byte_for_byte_whatever_the_read_sizes(size: int) -> None:
    upload = await parse(BODY, size)
    assert summary(upload) == [
        ("n", b"2", 2),
        ("image[]", 'a "b".png', "image/png", b"\x89PNG\r\n--XyNotTheBoundary\r\n\r\n"),
        ("image[]", "\u20ac.png", "", b""),
        ("stream", b"true", True),
    ]
    upload.close()


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (BODY[:-20], "ended"),
        (b"no boundary anywhere", "ended"),
        (b"--XyZ\r\nContent-Disposition: form-data\r\n\r\nx\r\n--XyZ--", "no name"),
        (b"--XyZ\r\nContent-Disposition: attachment; name=a\r\n\r\nx\r\n--XyZ--", "no name"),
        (b"--XyZ\r\nno colon here\r\n\r\nx\r\n--XyZ--", "without a name"),
        (b"--XyZ garbage\r\n\r\nx\r\n--XyZ--", "other text"),
        (b"--XyZ--\r\n", "no parts"),
    ],
)
async def test_malformed_bodies_are_400(body: bytes, why: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await parse(body)
    assert why in caught.value.message and caught.value.error_code == "invalid_multipart"


async def test_a_body_over_the_limit_is_413_once_it_passes() -> None:
    big = b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\n' + b"\0" * 5000
    with pytest.raises(PayloadTooLarge):
        await parse(big + b"\r\n--XyZ--", size=1000, limit=3000)


async def test_a_text_field_is_bounded() -> None:
    body = b'--XyZ\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n' + b"a" * 300_000 + b"\r\n--XyZ--"
    with pytest.raises(InvalidRequest) as caught:
        await parse(body, size=65536)
    assert caught.value.param == "prompt"


def field(name: str, value: bytes = b"x") -> bytes:
    return f'--XyZ\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"


def image(data: bytes = b"x", name: str = "image[]") -> bytes:
    return (
        f'--XyZ\r\nContent-Disposition: form-data; name="{name}"; filename="a.png"\r\n\r\n'.encode()
        + data
        + b"\r\n"
    )


async def refused(body: bytes) -> tuple[InvalidRequest, int]:
    """The 400 for `body`, and how many of its 100-byte pieces were never read."""
    reader = Pieces(body, 100)
    with pytest.raises(InvalidRequest) as caught:
        await parse(body, reader=reader)
    return caught.value, len(reader.pieces)


async def test_fields_past_the_bound_are_refused_before_the_rest_is_read() -> None:
    """One field more than MAX_FIELDS is a 400 naming the bound, whatever follows (the review's 20,000
    fields stalled every tenant for seconds: duplicates were looked for among all earlier fields)."""
    fields = b"".join(field(f"f{i}") for i in range(MAX_FIELDS))
    await parse(fields + b"--XyZ--")  # at the bound: read
    rest = b"".join(field(f"g{i}") for i in range(1000))
    error, unread = await refused(fields + rest + b"--XyZ--")
    assert error.error_code == "too_many_fields" and str(MAX_FIELDS) in error.message
    assert unread > len(rest) // 100 - 2  # the rest was never read


async def test_images_past_the_most_a_model_takes_are_refused_before_their_content() -> None:
    sixteen = field("prompt") + b"".join(image(name=n) for n in ["image"] + ["image[]"] * 15)
    upload = await parse(sixteen + b"--XyZ--")
    assert len(upload.files) == 16
    upload.close()
    error, unread = await refused(sixteen + image(b"\0" * 100_000) + b"--XyZ--")
    assert error.param == "image" and "16 images" in error.message
    assert unread > 100_000 // 100 - 2  # the 17th file's content was never read


async def test_a_duplicate_is_refused_however_many_fields_came_before() -> None:
    before = b"".join(field(f"f{i}") for i in range(MAX_FIELDS - 3))
    for body, name in [
        (before + field("n", b"1") + field("n", b"2"), "n"),
        (before + image(name="mask") + image(name="mask"), "mask"),
    ]:
        error, _ = await refused(body + b"--XyZ--")
        assert (error.error_code, error.param) == ("duplicate_parameter", name)
    upload = await parse(before + field("mask") + image(name="mask") + b"--XyZ--")  # a field and a file
    upload.close()


def test_the_most_images_are_the_catalogs() -> None:
    assert load_catalog().most_images == {"edit": 16, "variation": 1}
    more = load_catalog({"gpt-image-1.5": {"edits": {"max_images": 20}}})
    assert more.most_images["edit"] == 20


async def test_the_text_fields_are_bounded_together() -> None:
    third = TEXT_BYTES // 3 + 1
    body = field("prompt", b"a" * third) + field("user", b"b" * third) + field("size", b"c" * third)
    error, _ = await refused(body + b"--XyZ--")
    assert error.param == "size" and str(TEXT_BYTES) in error.message


async def test_files_keep_at_most_spool_bytes_in_memory_in_all() -> None:
    """Each file stays in memory only while the request's files hold SPOOL_BYTES at most together;
    the others are on disk (each file under its own 256 KiB once kept them all in memory)."""
    sizes = [SPOOL_BYTES // 4, SPOOL_BYTES, SPOOL_BYTES // 4, SPOOL_BYTES // 2, SPOOL_BYTES // 2]
    body = b"".join(image(bytes([i]) * size) for i, size in enumerate(sizes)) + b"--XyZ--"
    upload = await parse(body, size=4096)
    assert [f.in_memory for f in upload.files] == [True, False, True, True, False]
    assert sum(f.size for f in upload.files if not f.file._rolled) <= SPOOL_BYTES  # type: ignore[attr-defined]
    for index, part in enumerate(upload.files):  # on disk or not, the bytes as sent
        part.file.seek(0)
        assert part.file.read() == bytes([index]) * sizes[index]
    upload.close()


async def test_the_part_headers_kept_count_with_the_text_fields() -> None:
    """Each part's Content-Disposition and Content-Type are kept until the request is answered, like
    its text: with them in the text fields' bound, 20 parts of 15 KB headers are a 400, not 300 KB held
    past `HELD_BYTES` (they were counted nowhere)."""
    kind = b"Content-Type: text/plain; x=" + b"a" * 15_000 + b"\r\n"
    body = b"".join(field(f"f{i}").replace(b"\r\n\r\n", b"\r\n" + kind + b"\r\n", 1) for i in range(20))
    error, unread = await refused(body + b"--XyZ--\r\n")
    assert f"longer than {TEXT_BYTES} bytes in all" in error.message and error.param is not None
    assert unread > 0
    assert len(summary(await parse(b"".join(field(f"f{i}") for i in range(20)) + b"--XyZ--\r\n"))) == 20


async def test_the_parser_holds_no_more_than_the_body_and_decodes_text_once_it_is_read() -> None:
    """What the parser holds while it reads is bytes of the body, each once: the opening delimiter is
    not completed in its buffer, and a text field is kept as received (its value, which may take four
    times its bytes as a str, is decoded when asked, after the body)."""
    body = field("prompt", "\U0001f600".encode() + b"a" * 5000) + b"--XyZ--\r\n"
    upload = Upload()
    parser = _Parser(Pieces(body, len(body)), 10**9, b"XyZ", upload, most_images=16)  # type: ignore[arg-type]
    fill, seen = parser.fill, []

    async def watched() -> None:
        await fill()
        seen.append(len(parser.buffer))

    parser.fill = watched  # type: ignore[method-assign]
    await parser.run()
    assert seen == [len(body)]  # the whole body in one read, and nothing added to it
    [prompt] = upload.parts
    assert isinstance(prompt, TextPart)
    held = sum(sys.getsizeof(getattr(prompt, name)) for name in TextPart.__slots__)
    assert held < 1.5 * len(prompt.raw)  # the bytes; not with a 20 KB str of them besides
    assert prompt.value == "\U0001f600" + "a" * 5000


async def test_non_ascii_part_headers_and_file_names_count_as_the_memory_they_take() -> None:
    """A header or file name decoded with one character past Latin-1 takes 4 bytes a character in
    memory, and the file name is a second copy: 8 file parts of 9,000-character names with an emoji
    are 72 KB of body but ~576 KB held, which the text fields' bound refuses (counted as characters,
    it passed, holding 2-8 times what the upload was charged)."""
    name = ("x" * 8_999 + "\N{ROCKET}").encode()
    body = b"".join(image().replace(b'filename="a.png"', b'filename="' + name + b'"') for _ in range(8))
    error, _ = await refused(body + b"--XyZ--\r\n")
    assert f"longer than {TEXT_BYTES} bytes in all" in error.message
