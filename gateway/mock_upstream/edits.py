"""Edits and variations as OpenAI serves them: multipart in, validated as the API reference says.

`POST /v1/images/edits` takes `image` (one file) or `image[]` (up to 16; png, webp or jpeg, each
under 50MB), an optional `mask` (a png the size of the first image, under 4MB) and the generation fields but
`moderation`, plus `input_fidelity` (`low` | `high`; gpt-image-1-mini `low` only; gpt-image-2 none).
Its usage counts the input images' tokens (`models.input_image_tokens`) and streams name their
events `image_edit.*`. `POST /v1/images/variations` is dall-e-2's (one square png under 4MB, `n`,
`size`, `response_format`, `user`): served only when `MockOptions.serve_dall_e_2` says the upstream
still has dall-e-2 (OpenAI retired it; the real API answers 404). DigitalOcean has neither route.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image, UnidentifiedImageError

from gateway.mock_upstream.errors import UpstreamError, invalid
from gateway.mock_upstream.models import HIGH_FIDELITY_TOKENS, input_image_tokens
from gateway.mock_upstream.options import Flavor, ReceivedFile
from gateway.mock_upstream.validation import EDIT_FIELDS, Generation, validate

_MAX_IMAGES = 16
_MAX_BYTES = 50 * 2**20
_DALL_E_2_BYTES = 4 * 2**20
_MASK_BYTES = 4 * 2**20  # the SDK's `mask`: "less than 4MB", whatever the model
_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
_INTS = frozenset({"n", "partial_images", "output_compression"})
_DALL_E_2_SIZES = {"256x256": 256, "512x512": 512, "1024x1024": 1024}


@dataclass(frozen=True, slots=True)
class Form:
    fields: dict[str, str]
    files: list[ReceivedFile]


@dataclass(frozen=True, slots=True)
class Variation:
    """A valid dall-e-2 variation or edit: n square images of `side` pixels."""

    n: int
    side: int
    response_format: str


_DISPOSITION = re.compile(rb'\bname="([^"]*)"(?:;\s*filename="([^"]*)")?', re.IGNORECASE)


def parse_form(content_type: str, raw: bytes) -> Form:
    """The parts of a multipart/form-data body, byte for byte; 400 when it is not one."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith("multipart/form-data") or match is None:
        raise UpstreamError(400, "Invalid Content-Type header, expected multipart/form-data with a boundary.")
    delimiter = b"--" + match[1].encode()
    fields: dict[str, str] = {}
    files: list[ReceivedFile] = []
    for chunk in (b"\r\n" + raw).split(b"\r\n" + delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(b":") for line in head.split(b"\r\n") if b":" in line)
        }
        found = _DISPOSITION.search(headers.get(b"content-disposition", b""))
        if found is None:
            raise UpstreamError(400, "Could not parse multipart form: a part has no name.")
        name = found[1].decode("utf-8", "replace")
        if found[2] is not None:
            files.append(
                ReceivedFile(
                    name,
                    found[2].decode("utf-8", "replace"),
                    headers.get(b"content-type", b"").decode(),
                    data,
                )
            )
        else:
            fields[name] = data.decode("utf-8", "replace")
    return Form(fields, files)


def _typed(fields: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name, text in fields.items():
        if name in _INTS and re.fullmatch(r"-?[0-9]+", text):
            body[name] = int(text)
        elif name == "stream" and text in ("true", "false"):
            body[name] = text == "true"
        else:
            body[name] = text
    return body


def _image(file: ReceivedFile, param: str, formats: tuple[str, ...], max_bytes: int) -> tuple[str, int, int]:
    try:
        with Image.open(io.BytesIO(file.data)) as image:
            kind, (width, height) = _FORMATS.get(str(image.format), ""), image.size
    except (UnidentifiedImageError, OSError, ValueError):
        kind, width, height = "", 0, 0
    if kind not in formats:
        listed = ", ".join(f"'image/{f}'" for f in formats)
        message = (
            f"Invalid file '{param}': unsupported mimetype ('{file.content_type}'). "
            f"Supported file formats are {listed}."
        )
        raise invalid(param, message, "invalid_image_format")
    if len(file.data) > max_bytes:
        raise invalid(
            param, f"Invalid file '{param}': the file is larger than {max_bytes} bytes.", "file_too_large"
        )
    return kind, width, height


def validate_edit(form: Form, flavor: Flavor, serve_dall_e_2: bool) -> Generation | Variation:
    body = _typed(form.fields)
    images = [f for f in form.files if f.name in ("image", "image[]")]
    masks = [f for f in form.files if f.name == "mask"]
    for extra in form.files:
        if extra.name not in ("image", "image[]", "mask"):
            raise invalid(extra.name, f"Unknown parameter: '{extra.name}'.", "unknown_parameter")
    if serve_dall_e_2 and body.get("model") in (None, "", "dall-e-2") and "input_fidelity" not in body:
        return _dall_e_2(body, images, masks, edit=True)
    if not images:
        raise invalid("image", "Missing required parameter: 'image'.", "missing_required_parameter")
    if len(images) > _MAX_IMAGES:
        raise invalid(
            "image",
            f"Invalid 'image': too many images. Expected at most {_MAX_IMAGES}.",
            "array_above_max_length",
        )
    fidelity = body.pop("input_fidelity", None)
    gen = validate(body, flavor, EDIT_FIELDS)
    if fidelity is not None:
        _check_fidelity(fidelity, gen)
    dims = [_image(f, "image", ("png", "webp", "jpeg"), _MAX_BYTES)[1:] for f in images]
    if masks:
        _, width, height = _image(masks[0], "mask", ("png",), _MASK_BYTES)
        if (width, height) != dims[0]:
            raise invalid("mask", "Invalid mask image: the mask must have the same dimensions as the image.")
    image_in = sum(input_image_tokens(gen.family, w, h) for w, h in dims)
    if fidelity == "high" and gen.family == "gpt-image-1":
        image_in += HIGH_FIDELITY_TOKENS[dims[0][0] == dims[0][1]]
    return replace(gen, events="image_edit", image_in=image_in)


def _check_fidelity(fidelity: object, gen: Generation) -> None:
    if gen.family == "gpt-image-2":
        raise invalid(
            "input_fidelity", f"input_fidelity is not supported for {gen.model}.", "unsupported_parameter"
        )
    allowed = ("low",) if gen.model.endswith("-mini") else ("low", "high")
    if fidelity not in allowed:
        listed = ", ".join(f"'{a}'" for a in allowed)
        raise invalid("input_fidelity", f"Invalid value: '{fidelity}'. Supported values are: {listed}.")


def validate_variation(form: Form, serve_dall_e_2: bool) -> Variation:
    body = _typed(form.fields)
    model = body.get("model") or "dall-e-2"
    if model != "dall-e-2" or not serve_dall_e_2:
        raise UpstreamError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )
    for name in body:
        if name not in ("model", "n", "size", "response_format", "user"):
            raise invalid(name, f"Unknown parameter: '{name}'.", "unknown_parameter")
    images = [f for f in form.files if f.name == "image"]
    return _dall_e_2(body, images, [], edit=False)


def _dall_e_2(
    body: dict[str, Any], images: list[ReceivedFile], masks: list[ReceivedFile], *, edit: bool
) -> Variation:
    if len(images) != 1:
        raise invalid("image", "Invalid 'image': dall-e-2 takes exactly one image.")
    _, width, height = _image(images[0], "image", ("png",), _DALL_E_2_BYTES)
    if width != height:
        raise invalid("image", "Invalid input image - image must be square.")
    if masks:
        _, mw, mh = _image(masks[0], "mask", ("png",), _MASK_BYTES)
        if (mw, mh) != (width, height):
            raise invalid("mask", "Invalid mask image: the mask must have the same dimensions as the image.")
    if edit and not body.get("prompt"):
        raise invalid("prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter")
    n = body.get("n", 1)
    if not isinstance(n, int) or not 1 <= n <= 10:
        raise invalid("n", f"Invalid 'n': expected an integer from 1 to 10, got {n!r}.")
    size = body.get("size", "1024x1024")
    if size not in _DALL_E_2_SIZES:
        raise invalid(
            "size", f"Invalid value: '{size}'. Supported values are: '256x256', '512x512', and '1024x1024'."
        )
    response_format = body.get("response_format", "url")
    if response_format not in ("url", "b64_json"):
        raise invalid(
            "response_format",
            f"Invalid value: '{response_format}'. Supported values are: 'url' and 'b64_json'.",
        )
    return Variation(n, _DALL_E_2_SIZES[size], response_format)
