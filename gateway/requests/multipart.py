"""Reading a multipart/form-data request (edits, variations) as it streams in, into an `Upload`.

Each file part is spooled as it arrives (`gateway.requests.uploads`); text fields are kept with
their raw bytes. The whole request is bounded by `server.max_upload_bytes`, checked as the bytes
arrive: 413 the moment the limit is passed (a declared Content-Length over it is refused before
reading anything). Fields may come before or after the files; nothing is decided until the last
part is read. Every malformed body is an OpenAI-style 400 (415 for another content type), and the
spooled files are closed on every path, including a client that leaves mid-upload.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import BodyPartReader, web

from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.requests.uploads import CHUNK_BYTES, FilePart, TextPart, Upload, close_quietly, part_headers

IMAGE_FIELDS = ("image", "image[]")
MASK_FIELD = "mask"
TEXT_FIELD_BYTES = 256 * 1024  # a 32,000-character prompt is at most 128,000 bytes of UTF-8
_INT_FIELDS = frozenset({"n", "partial_images", "output_compression"})
_BOOL_FIELDS = frozenset({"stream"})
_BOOLS = {"true": True, "false": False}
_INTEGER = re.compile(r"-?[0-9]{1,9}")


def _malformed(why: str) -> InvalidRequest:
    return InvalidRequest(f"The multipart body is malformed: {why}.", code="invalid_multipart")


async def read_multipart(request: web.Request, limit: int) -> Upload:
    """Every part of the request, files spooled; raises an OpenAI-style 4xx for a bad body."""
    content_type = request.headers.get("Content-Type", "")
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Content-Type must be multipart/form-data, got {content_type or 'none'!r}.",
            code="invalid_content_type",
        )
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError):
        raise _malformed("Content-Type has no boundary") from None
    upload = Upload()
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise _malformed("nested multipart parts are not accepted")
            upload.parts.append(await _read_part(request, part, upload, limit))
    except GatewayError:
        close_quietly(upload)
        raise
    except (ValueError, AssertionError, LookupError, EOFError):
        close_quietly(upload)
        raise _malformed("the body ended early or a part is broken") from None
    except BaseException:  # the client left (connection reset, cancelled): nothing to answer
        close_quietly(upload)
        raise
    if not upload.parts:
        raise _malformed("no parts")
    return upload


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The upload is larger than the gateway's limit of {limit} bytes.")


async def _read_part(
    request: web.Request, part: BodyPartReader, upload: Upload, limit: int
) -> TextPart | FilePart:
    name = part.name
    if not name:
        raise _malformed("a part has no name in its Content-Disposition")
    headers = part_headers(part.headers)
    if part.filename is not None:
        file = FilePart(name, part.filename, part.headers.get("Content-Type", ""), headers)
        try:
            while chunk := await part.read_chunk(CHUNK_BYTES):
                _check_size(request, limit)
                file.write(chunk)
        except BaseException:
            file.close()
            raise
        if name == MASK_FIELD and any(p.name == MASK_FIELD for p in upload.files):
            file.close()
            raise _duplicate(name)
        return file
    if any(p.name == name for p in upload.parts if isinstance(p, TextPart)):
        raise _duplicate(name)
    raw = b""
    while chunk := await part.read_chunk(CHUNK_BYTES):
        _check_size(request, limit)
        raw += chunk
        if len(raw) > TEXT_FIELD_BYTES:
            raise InvalidRequest(
                f"The field {name!r} is longer than {TEXT_FIELD_BYTES} bytes.",
                param=name,
                code="invalid_value",
            )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(
            f"The field {name!r} is not valid UTF-8.", param=name, code="invalid_value"
        ) from None
    return TextPart(name, raw, _typed(name, text), headers)


def _check_size(request: web.Request, limit: int) -> None:
    if request.content.total_bytes > limit:
        raise _too_large(limit)


def _duplicate(name: str) -> InvalidRequest:
    return InvalidRequest(
        f"The field {name!r} is sent more than once.", param=name, code="duplicate_parameter"
    )


def _typed(name: str, text: str) -> Any:
    """A form value as the policy reads it: integers and booleans where the API has them (a value
    that is not one stays a string, which the capability checks refuse), an empty value as null."""
    if text == "":
        return None
    if name in _INT_FIELDS and _INTEGER.fullmatch(text):
        return int(text)
    if name in _BOOL_FIELDS and text.lower() in _BOOLS:
        return _BOOLS[text.lower()]
    return text
