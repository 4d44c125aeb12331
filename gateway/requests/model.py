"""One client request, whatever its shape: the operation, the fields, the uploaded files.

`read_request` is the parse stage: a generation is a JSON body (`server.max_body_bytes`), an edit
or a variation a multipart body (`server.max_upload_bytes`). Either way the policy sees the fields
as one dict and the files as `policies.uploads.Inputs` (read from their headers), and the forward
step gets `upstream_body(fields)`: bytes for JSON, a re-sendable multipart body for uploads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from gateway.config import ServerSettings
from gateway.front.body import BodyReader
from gateway.requests.json_body import parse
from gateway.requests.multipart import IMAGE_FIELDS, MASK_FIELD, read_multipart
from gateway.requests.uploads import TextPart, Upload, UploadBody, close_quietly
from policies.catalog import Catalog
from policies.entry import Operation
from policies.uploads import GENERATE, Inputs

# The upstream path of each operation, under the upstream's base URL
PATHS: dict[Operation, str] = {
    "generate": "/images/generations",
    "edit": "/images/edits",
    "variation": "/images/variations",
}


@dataclass(slots=True)
class ClientRequest:
    operation: Operation
    body: dict[str, Any]  # the fields, as the policy reads them
    inputs: Inputs
    upload: Upload | None = None  # the spooled parts of a multipart request

    def upstream_body(self, fields: dict[str, Any]) -> bytes | UploadBody:
        """What to send upstream for the decided `fields`; a multipart body may be sent again."""
        if self.upload is None:
            return orjson.dumps(fields)
        return self.upload.body(fields)

    def close(self) -> None:
        """Free the spooled files (deleting any temporary file); safe to call more than once."""
        close_quietly(self.upload)

    def log_fields(self) -> dict[str, int]:
        """What the access log says of an upload: how many input images, how many bytes of files."""
        if self.upload is None:
            return {}
        return {
            "input_images": len(self.inputs.images),
            "upload_bytes": sum(f.size for f in self.upload.files),
        }


async def read_request(
    request: web.Request, operation: Operation, server: ServerSettings, bodies: BodyReader, catalog: Catalog
) -> ClientRequest:
    """The parse stage: the request as one model, or an OpenAI-style 4xx. The body is read through
    the front door's bounds (`gateway.front.body`); an upload's images up to the most `catalog`'s
    models take, so that no more files are read (and their headers looked at) than may be used."""
    if operation == "generate":
        return ClientRequest("generate", await parse(request, bodies, server), GENERATE)
    upload = await read_multipart(request, bodies, server, catalog.most_images[operation])
    try:
        return _from_upload(operation, upload)
    except BaseException:
        close_quietly(upload)
        raise


def _from_upload(operation: Operation, upload: Upload) -> ClientRequest:
    body = {p.name: p.value for p in upload.parts if isinstance(p, TextPart)}
    images = tuple(f.describe() for f in upload.files if f.name in IMAGE_FIELDS)
    masks = [f.describe() for f in upload.files if f.name == MASK_FIELD]
    extra = tuple(f.name for f in upload.files if f.name not in IMAGE_FIELDS and f.name != MASK_FIELD)
    inputs = Inputs(operation, images, masks[0] if masks else None, extra)
    return ClientRequest(operation, body, inputs, upload)
