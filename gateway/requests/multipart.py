"""Reading a multipart/form-data request (edits, variations) as it streams in, into an `Upload`.

A small streaming parser over the request body (RFC 7578 / RFC 2046): each file part goes to its
spooled file as the bytes arrive (`gateway.requests.uploads`), never whole in memory; text fields
are kept with their raw bytes. Only the delimiter is searched for, from where the last search
stopped, so each byte is looked at about once (aiohttp's own reader copies its window and
re-parses Content-Disposition with fresh regular expressions on every call: several ms per MB).

The whole request is bounded by `server.max_upload_bytes`, counted as the bytes arrive: 413 the
moment the limit is passed (a declared Content-Length over it is refused before reading anything).
Fields may come before or after the files; nothing is decided until the last part is read, except
what bounds the work and memory of one request, refused as soon as a part's headers say so: more
image files than any model takes (the catalog's largest `max_images`), more than `MAX_FIELDS` other
parts, a text field or the mask a second time (found in a set: one request's parts cost linear time,
however many). Every malformed body is an OpenAI-style 400 (415 for another content type), and
the spooled files are closed on every path, including a client that leaves mid-upload.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from aiohttp import hdrs, web

from gateway.config import ServerSettings
from gateway.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.front.body import BodyReader, BoundedBody
from gateway.requests.uploads import SPOOL_BYTES, FilePart, TextPart, Upload, close_quietly, part_headers
from policies.findings import shown

IMAGE_FIELDS = ("image", "image[]")
MASK_FIELD = "mask"
# The text fields and the part headers kept, in all: a 32,000-character prompt is at most 128,000 bytes.
TEXT_BYTES = 256 * 1024
HEAD_BYTES = 16 * 1024  # the headers of one part
PREAMBLE_BYTES = 64 * 1024  # what may come before the first delimiter
READ_BYTES = 256 * 1024  # the most one read of the body brings (uvloop and asyncio read 256 KiB)
# What the parser holds in memory at most, taken from the shared body budget while it reads: the text
# fields and headers, the files kept in memory, and its buffer (a delimiter's or a head's search, and
# one read). A text field's value is held as its bytes until the body is read; a part's kept headers
# and its name or file name are held decoded, up to 4 bytes a character, and counted so
# (`_held`). So a body with a Content-Length is charged HELD_PER_BYTE times that length where that is
# smaller: its bytes held as decoded header text and once more as a name.
HELD_BYTES = TEXT_BYTES + SPOOL_BYTES + PREAMBLE_BYTES + READ_BYTES
HELD_PER_BYTE = 8
# Parts other than the images: an edit takes 13 fields and a mask, a variation 5 (the SDK sends only
# those). Room for fields a policy drops, and a bound on the work and memory of one request's parts.
MAX_FIELDS = 64
# And each part's own objects (its headers, name, record: about 1 KB), for the most parts a request
# may have: the fields and as many images, whatever the size of the body.
PARTS_BYTES = 2 * MAX_FIELDS * 1024
_BOUNDARY = re.compile(r';\s*boundary\s*=\s*(?:"([^"]{1,200})"|([^\s;"]{1,200}))', re.IGNORECASE)
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def _malformed(why: str) -> InvalidRequest:
    return InvalidRequest(f"The multipart body is malformed: {why}.", code="invalid_multipart")


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The upload is larger than the gateway's limit of {limit} bytes.")


async def read_multipart(
    request: web.Request, bodies: BodyReader, server: ServerSettings, most_images: int
) -> Upload:
    """Every part of the request, files spooled; raises an OpenAI-style 4xx for a bad body. The body
    is read through the front door's bounds (encoding, time, the shared budget for what the parser
    holds in memory), up to `server.max_upload_bytes`, with at most `most_images` image parts (the
    most any model takes) and `MAX_FIELDS` others, refused as soon as one more part starts. It takes
    from the budget what the parser may hold, `HELD_BYTES`, or `HELD_PER_BYTE` times the
    Content-Length and `PARTS_BYTES` where that is less (a small upload still arriving must not
    count as a large one against its tenant's share), and never more than the whole budget."""
    limit, spool_dir = server.max_upload_bytes, server.upload_dir
    content_type = request.headers.get(hdrs.CONTENT_TYPE, "")
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
        raise UnsupportedMediaType(
            "Content-Type must be multipart/form-data,"
            f" got {shown(content_type) if content_type else 'none'}.",
            code="invalid_content_type",
        )
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise _malformed("Content-Type has no boundary")
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    held = HELD_BYTES if length is None else min(HELD_BYTES, HELD_PER_BYTE * length + PARTS_BYTES)
    charge = min(held, server.max_buffered_body_bytes)  # (a smaller budget: one upload at a time)
    upload = Upload()
    try:
        boundary = (found[1] or found[2]).encode()
        too_large = _too_large(limit)
        async with bodies.open(request, server, limit=limit, charge=charge, too_large=too_large) as body:
            await _Parser(body, limit, boundary, upload, most_images=most_images, spool_dir=spool_dir).run()
    except BaseException:  # a 4xx, or the client left (connection reset, cancelled)
        close_quietly(upload)
        raise
    return upload


class _Parser:
    """One pass over the body: preamble, then (headers, content) per part, until the close delimiter."""

    def __init__(
        self,
        content: BoundedBody,
        limit: int,
        boundary: bytes,
        upload: Upload,
        *,
        most_images: int,
        spool_dir: str | None = None,
    ) -> None:
        self.content = content
        self.spool_dir = spool_dir
        self.limit = limit
        self.received = 0
        self.buffer = bytearray()
        self.delimiter = b"\r\n--" + boundary
        self.upload = upload
        self.most_images = most_images
        self.images = self.fields = 0  # parts so far
        self.seen: set[tuple[bool, str]] = set()  # (a file?, name) of the text fields and mask so far
        self.text_room = TEXT_BYTES  # what the text fields and kept headers may still take
        self.file_room = SPOOL_BYTES  # what the files may still keep in memory

    async def fill(self) -> None:
        """Read what has arrived; 400 at the end of the body (every caller still needs bytes)."""
        chunk = await self.content.readany()
        if not chunk:
            raise _malformed("the body ended before the closing boundary")
        self.received += len(chunk)
        if self.received > self.limit:
            raise _too_large(self.limit)
        self.buffer += chunk

    async def run(self) -> None:
        # The first delimiter may open the body, without the CRLF the others have (not added to the
        # buffer: it would hold more than the body's bytes).
        opening = self.delimiter[2:]
        while len(self.buffer) < len(opening):
            await self.fill()
        if self.buffer.startswith(opening):
            del self.buffer[: len(opening)]
        else:
            start = await self.find(self.delimiter, PREAMBLE_BYTES, "no opening boundary")
            del self.buffer[: start + len(self.delimiter)]
        while await self.after_delimiter():
            self.upload.parts.append(await self.part())
        if not self.upload.parts:
            raise _malformed("no parts")

    async def find(self, needle: bytes, most: int, why: str) -> int:
        position = 0
        while (found := self.buffer.find(needle, position)) < 0:
            if len(self.buffer) > most:
                raise _malformed(why)
            position = max(0, len(self.buffer) - len(needle) + 1)
            await self.fill()
        return found

    async def after_delimiter(self) -> bool:
        """After a delimiter: False for the close delimiter (`--`), True when a part follows."""
        while len(self.buffer) < 2:
            await self.fill()
        if self.buffer[:2] == b"--":
            return False
        end = await self.find(b"\r\n", 1024, "a boundary line does not end")
        if self.buffer[:end].strip(b" \t"):  # only transport padding may follow a delimiter
            raise _malformed("a boundary is followed by other text")
        del self.buffer[: end + 2]
        return True

    async def part(self) -> TextPart | FilePart:
        while len(self.buffer) < 2:
            await self.fill()
        if self.buffer[:2] == b"\r\n":
            head_end, headers = 0, {}  # a part without headers
        else:
            head_end = await self.find(b"\r\n\r\n", HEAD_BYTES, "a part's headers are too long") + 2
            headers = _headers(bytes(self.buffer[:head_end]))
        del self.buffer[: head_end + 2]
        params = _disposition(headers.get("content-disposition", ""))
        name = params.get("name")
        if not name:
            raise _malformed("a part has no name in its Content-Disposition")
        kept = part_headers(headers)
        # kept to the end, as the text is: the headers forwarded, and the name and file name
        self.text_room -= sum(_held(value) for _, value in kept) + _held(name)
        self.text_room -= _held(params.get("filename", ""))
        self.check_text(name, 0)
        is_file = "filename" in params
        self.count(name, is_file)
        if is_file:
            kind = headers.get("content-type", "")
            file = FilePart(name, params["filename"], kind, kept, self.spool_dir, memory=self.file_room)
            try:
                await self.content_into(file.write, None)
            except BaseException:
                file.close()
                raise
            self.file_room -= file.memory_bytes
            return file
        pieces: list[bytes] = []
        await self.content_into(lambda view: pieces.append(bytes(view)), name)
        raw = b"".join(pieces)
        self.text_room -= len(raw)
        try:
            raw.decode("utf-8")  # checked now; decoded again for its value once the body is read
        except UnicodeDecodeError:
            raise InvalidRequest(f"The field {name!r} is not valid UTF-8.", param=name) from None
        return TextPart(name, raw, kept)

    def count(self, name: str, is_file: bool) -> None:
        """Refuse a part over the bounds before reading it: one image more than any model takes, a
        field more than `MAX_FIELDS`, a text field or the mask a second time."""
        if is_file and name in IMAGE_FIELDS:
            self.images += 1
            if self.images > self.most_images:
                most = "one image" if self.most_images == 1 else f"{self.most_images} images"
                message = f"The request sends more than {most}: no model takes more here."
                raise InvalidRequest(message, param="image")
            return
        self.fields += 1
        if self.fields > MAX_FIELDS:
            message = f"The request sends more than {MAX_FIELDS} fields besides its images."
            raise InvalidRequest(message, code="too_many_fields")
        if not is_file or name == MASK_FIELD:  # a text field, or the mask, may come once
            if (is_file, name) in self.seen:
                raise _duplicate(name)
            self.seen.add((is_file, name))

    async def content_into(self, sink: Any, text_field: str | None) -> None:
        """Pass the part's content to `sink` up to the next delimiter, as it arrives; a text field
        only while the text fields stay within `TEXT_BYTES`."""
        delimiter, keep = self.delimiter, len(self.delimiter) - 1
        size, position = 0, 0
        while (found := self.buffer.find(delimiter, position)) < 0:
            ready = len(self.buffer) - keep  # the tail may be the start of the delimiter
            if ready > 0:
                size += ready
                self.check_text(text_field, size)
                with memoryview(self.buffer) as view:
                    sink(view[:ready])  # no copy: a file writes it at once, a text field copies it
                del self.buffer[:ready]
            position = 0
            await self.fill()
        self.check_text(text_field, size + found)
        if found:
            with memoryview(self.buffer) as view:
                sink(view[:found])
        del self.buffer[: found + len(delimiter)]

    def check_text(self, text_field: str | None, size: int) -> None:
        if text_field is not None and size > self.text_room:
            message = (
                f"The text fields and part headers are longer than {TEXT_BYTES} bytes in all"
                f" (at {text_field!r})."
            )
            raise InvalidRequest(message, param=text_field)


def _held(text: str) -> int:
    """The bytes `text` may take in memory: one a character if ASCII, else up to four."""
    return len(text) if text.isascii() else 4 * len(text)


def _headers(block: bytes) -> dict[str, str]:
    """A part's headers, names lower-cased; values kept as sent (surrogate-escaped non-UTF-8)."""
    headers = {}
    for line in block.decode("utf-8", "surrogateescape").split("\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise _malformed("a part has a header line without a name")
        headers[name.strip().lower()] = value.strip()
    return headers


def _disposition(header: str) -> dict[str, str]:
    """`form-data; name="x"; filename="a.png"` as {name, filename}; `filename*` (RFC 5987) wins."""
    kind, _, rest = header.partition(";")
    if kind.strip().lower() != "form-data":
        return {}
    params: dict[str, str] = {}
    for raw_key, raw_value in _PARAM.findall(";" + rest):
        key = raw_key.lower()
        value = re.sub(r"\\(.)", r"\1", raw_value[1:-1]) if raw_value.startswith('"') else raw_value
        if key.endswith("*"):
            charset, _, encoded = value.partition("'")
            key, value = key[:-1], unquote(encoded.partition("'")[2], charset or "utf-8", "replace")
        elif key in params:
            continue  # a filename* seen earlier wins over a plain filename
        params[key] = value.strip() if key == "name" else value
    return params


def _duplicate(name: str) -> InvalidRequest:
    message = f"The field {name!r} is sent more than once."
    return InvalidRequest(message, param=name, code="duplicate_parameter")
