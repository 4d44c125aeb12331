"""An upload's parts, spooled, and the multipart body that carries them to the upstream.

Owns the parts of a multipart request as received (text fields with their raw bytes, files in
SpooledTemporaryFiles: in memory while the request's files hold at most `SPOOL_BYTES` in all, then
an anonymous temporary file that the system deletes when it is closed, whatever happens), what a
file's header says it is (format and dimensions, `gateway.requests.image_header`), and
`UploadBody`: the multipart body for the upstream, built from the decided fields and streamed from
the spooled files.
The body can be sent more than once (each send rewinds the files), so a retry to another target
sends the same bytes. Files go out byte-identical, in their order, under their own
Content-Disposition and Content-Type; text fields the policy did not change go out as received.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import InitVar, dataclass, field
from tempfile import SpooledTemporaryFile
from typing import Any

from gateway.requests.image_header import read_header
from policies.uploads import InputImage

# What one request's files keep in memory, in all (a small image or mask); the rest is on disk. Per
# request, not per file: 240 files of 255 KiB each would otherwise be 60 MiB of memory.
SPOOL_BYTES = 64 * 1024
CHUNK_BYTES = 256 * 1024  # read and sent in pieces of this size
_INT_FIELDS = frozenset({"n", "partial_images", "output_compression"})
_BOOL_FIELDS = frozenset({"stream"})
_BOOLS = {"true": True, "false": False}
_INTEGER = re.compile(r"-?[0-9]{1,9}")


@dataclass(slots=True)
class TextPart:
    name: str
    raw: bytes  # the value as received (UTF-8: the parser checked it)
    headers: list[tuple[str, str]]

    @property
    def value(self) -> Any:
        """The value as the policy reads it: integers and booleans where the API has them (a value
        that is not one stays a string, which the capability checks refuse), an empty value as null.
        Decoded when asked, after the body is read: while it is read, only the bytes are held, which
        is what the body budget counts (a decoded text may take up to four times its bytes)."""
        text = self.raw.decode("utf-8")
        if text == "":
            return None
        if self.name in _INT_FIELDS and _INTEGER.fullmatch(text):
            return int(text)
        if self.name in _BOOL_FIELDS and text.lower() in _BOOLS:
            return _BOOLS[text.lower()]
        return text


@dataclass(slots=True)
class FilePart:
    name: str
    filename: str
    content_type: str
    headers: list[tuple[str, str]]
    directory: InitVar[str | None] = None  # where it spools (None: the system's temporary directory)
    memory: int = SPOOL_BYTES  # the most it keeps in memory: past it, the file is on disk
    file: SpooledTemporaryFile[bytes] = field(init=False)
    size: int = 0
    in_memory: bool = True  # not yet on disk

    def __post_init__(self, directory: str | None) -> None:
        # closed by close(): on every path of the request that owns it. No size of its own (0): it
        # moves to disk in `write`, when `memory` would be passed.
        self.file = SpooledTemporaryFile(0, dir=directory)  # noqa: SIM115

    def write(self, chunk: bytes | memoryview) -> None:
        if self.in_memory and self.size + len(chunk) > self.memory:
            self.file.rollover()
            self.in_memory = False
        self.file.write(chunk)
        self.size += len(chunk)

    @property
    def memory_bytes(self) -> int:
        """The bytes of the file held in memory."""
        return self.size if self.in_memory else 0

    def describe(self) -> InputImage:
        """What the file is, from its header; `format` None when it is no image we read."""
        kind, width, height = read_header(self.file, self.size) or (None, 0, 0)
        return InputImage(self.name, self.filename, self.content_type, kind, width, height, self.size)

    def close(self) -> None:
        self.file.close()


@dataclass(slots=True)
class Upload:
    """Every part of one multipart request, in the order received; close() frees the spooled files."""

    parts: list[TextPart | FilePart] = field(default_factory=list)

    @property
    def files(self) -> list[FilePart]:
        return [p for p in self.parts if isinstance(p, FilePart)]

    def close(self) -> None:
        for part in self.files:
            part.close()

    def body(self, fields: Mapping[str, Any]) -> UploadBody:
        """The multipart body for the upstream: `fields` (the decided body) and the files."""
        boundary = f"gateway-{uuid.uuid4().hex}"
        pieces: list[bytes | FilePart] = []
        sent: set[str] = set()
        for part in self.parts:
            if isinstance(part, FilePart):
                pieces += [_head(boundary, part.headers), part, b"\r\n"]
                continue
            received = part.value
            if part.name not in fields or (fields[part.name] is None and received is not None):
                continue  # removed by the policy (a dropped null is not sent)
            value = fields[part.name]
            raw = part.raw if value == received and type(value) is type(received) else _text(value)
            pieces += [_head(boundary, part.headers) + raw + b"\r\n"]
            sent.add(part.name)
        for name, value in fields.items():
            if name not in sent and value is not None:
                disposition = f'form-data; name="{name}"'
                pieces.append(
                    _head(boundary, [("Content-Disposition", disposition)]) + _text(value) + b"\r\n"
                )
        pieces.append(b"--" + boundary.encode() + b"--\r\n")
        return UploadBody(f"multipart/form-data; boundary={boundary}", pieces)


@dataclass(frozen=True, slots=True)
class UploadBody:
    """A multipart body that can be streamed any number of times; `length` is known in advance."""

    content_type: str
    pieces: list[bytes | FilePart]

    @property
    def length(self) -> int:
        return sum(len(p) if isinstance(p, bytes) else p.size for p in self.pieces)

    async def chunks(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            if isinstance(piece, bytes):
                yield piece
                continue
            piece.file.seek(0)
            while chunk := piece.file.read(CHUNK_BYTES):
                yield chunk


def _head(boundary: str, headers: list[tuple[str, str]]) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"--{boundary}\r\n{lines}\r\n".encode("utf-8", "surrogateescape")


def _text(value: Any) -> bytes:
    if value is True or value is False:
        return b"true" if value else b"false"
    return str(value).encode()


def part_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The headers of a part worth forwarding (`headers` keyed in lower case): its
    Content-Disposition and Content-Type, their values as sent."""
    names = (("Content-Disposition", "content-disposition"), ("Content-Type", "content-type"))
    return [(name, headers[key]) for name, key in names if key in headers]


def close_quietly(upload: Upload | None) -> None:
    if upload is not None:
        with contextlib.suppress(OSError):
            upload.close()
