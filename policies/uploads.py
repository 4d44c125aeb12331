"""Input images of edits and variations: what a request uploaded, what a model accepts, and their tokens.

Owns `Inputs` (the operation and the uploaded files as the gateway read them from their headers:
format, dimensions, bytes; never pixels), the capability checks on those files (`check`: how many,
which formats, how large, square, the mask) and `input_tokens` (the `image_in` tokens one request's
images cost, by the catalog's `input_image_tokens` rule). Pure: nothing here reads a file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from policies.entry import InputImageTokens, ModelEntry, Operation, UploadRule
from policies.findings import CAPABILITY, INVALID_VALUE, MISSING_REQUIRED, Violation, quoted

UNSUPPORTED_OPERATION = "unsupported_operation"
_NAMES = {"generate": "image generations", "edit": "image edits", "variation": "image variations"}


@dataclass(frozen=True, slots=True)
class InputImage:
    """One uploaded file as read from its header. `format` is None when it is not an image at all."""

    field: str  # the form field it came in: image, image[] or mask
    filename: str
    content_type: str
    format: str | None  # png | jpeg | webp | gif | ... (lower case), as the file says, not its name
    width: int = 0
    height: int = 0
    size_bytes: int = 0

    @property
    def dimensions(self) -> str:
        return f"{self.width}x{self.height}"

    def describe(self) -> dict[str, object]:
        return {
            "field": self.field,
            "filename": self.filename,
            "content_type": self.content_type,
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "bytes": self.size_bytes,
        }


@dataclass(frozen=True, slots=True)
class Inputs:
    """What a request asks to do, and with which files (none for a generation)."""

    operation: Operation = "generate"
    images: tuple[InputImage, ...] = ()
    mask: InputImage | None = None
    extra: tuple[str, ...] = field(default=())  # file fields that are neither image nor mask


GENERATE = Inputs()


def operation_name(operation: Operation) -> str:
    return _NAMES[operation]


def _error(param: str | None, message: str, code: str = INVALID_VALUE) -> Violation:
    return Violation(CAPABILITY, param, message, None, code)


def check(entry: ModelEntry, inputs: Inputs, model: str) -> Violation | None:
    """The first thing `model` would refuse about the uploaded files, or None."""
    rule = entry.upload_rule(inputs.operation)
    if rule is None:
        return None
    if inputs.extra:
        return _error(
            inputs.extra[0], f"Unknown file field {inputs.extra[0]!r}: send 'image' (or 'image[]')."
        )
    if not inputs.images:
        return _error("image", "Missing required parameter: 'image'.", MISSING_REQUIRED)
    if len(inputs.images) > rule.max_images:
        most = "one image" if rule.max_images == 1 else f"at most {rule.max_images} images"
        return _error("image", f"{model} takes {most}; the request has {len(inputs.images)}.")
    for image in inputs.images:
        problem = _file_problem(rule, image, model)
        if problem:
            return _error("image", problem)
    if inputs.mask is not None:
        return _mask_problem(rule, inputs.mask, inputs.images[0], model)
    return None


def _file_problem(rule: UploadRule, image: InputImage, model: str) -> str | None:
    name = repr(image.filename or image.field)
    if image.format is None:
        return f"The file {name} is not an image {model} can read ({quoted(rule.formats)})."
    if image.format not in rule.formats:
        return f"The file {name} is {image.format}; {model} takes {quoted(rule.formats)}."
    if image.size_bytes > rule.max_bytes:
        return (
            f"The file {name} is {image.size_bytes} bytes; {model} takes files under {rule.max_bytes} bytes."
        )
    if rule.square and image.width != image.height:
        return f"The image {name} is {image.dimensions}; {model} takes square images only."
    return None


def _mask_problem(rule: UploadRule, mask: InputImage, first: InputImage, model: str) -> Violation | None:
    if not rule.mask:
        return _error("mask", f"{model} does not take a mask here.")
    name = repr(mask.filename or "mask")
    if mask.format != "png":
        what = "not an image" if mask.format is None else mask.format
        return _error("mask", f"The mask {name} must be a png; it is {what}.")
    if mask.size_bytes > rule.mask_max_bytes:
        limit = rule.mask_max_bytes
        return _error(
            "mask", f"The mask {name} is {mask.size_bytes} bytes; {model} takes a mask under {limit} bytes."
        )
    if (mask.width, mask.height) != (first.width, first.height):
        message = (
            f"The mask is {mask.dimensions}; it must have the first image's dimensions ({first.dimensions})."
        )
        return _error("mask", message)
    return None


def unsupported(entry: ModelEntry, operation: Operation, model: str) -> Violation | None:
    """400 when the model has no endpoint for `operation` (dall-e-3 edits, variations but dall-e-2)."""
    if operation in entry.operations:
        return None
    return _error("model", f"{model} does not support {_NAMES[operation]}.", UNSUPPORTED_OPERATION)


def input_tokens(entry: ModelEntry, inputs: Inputs, fidelity: object) -> int:
    """Image input tokens of a request: every image and the mask (an upper bound: whether the mask
    is billed is not documented), by the model's rule; 0 for models not billed by token."""
    rule = entry.input_image_tokens
    if rule is None or inputs.operation == "generate":
        return 0
    files = [*inputs.images, *([inputs.mask] if inputs.mask is not None else [])]
    total = sum(image_tokens(rule, f.width, f.height) for f in files if f.width > 0 and f.height > 0)
    if fidelity == "high":
        for image in inputs.images[: rule.high_fidelity_images]:
            square = image.width == image.height
            total += rule.high_fidelity_square if square else rule.high_fidelity_other
    return total


def image_tokens(rule: InputImageTokens, width: int, height: int) -> int:
    """The tokens of one input image of `width` x `height` pixels (see InputImageTokens)."""
    if rule.method == "tiles":
        scale = min(1.0, rule.fit / max(width, height))
        w, h = width * scale, height * scale
        scale = min(1.0, rule.short_side / min(w, h))
        w, h = math.floor(w * scale), math.floor(h * scale)
        tiles = math.ceil(max(w, 1) / rule.tile) * math.ceil(max(h, 1) / rule.tile)
        return rule.base + rule.per_tile * tiles
    magnify = min(float(rule.max_magnify), max(1.0, rule.magnify_to / max(width, height)))
    w, h = width * magnify, height * magnify
    # an image over the budget is scaled down until it fits: the budget bounds it from above
    return min(rule.budget, math.ceil(w / rule.patch) * math.ceil(h / rule.patch))
