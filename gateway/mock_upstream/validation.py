"""Request validation as the upstream does it: a `Generation` out, or the 400 the upstream would send.

Messages and codes follow OpenAI's (`unknown_parameter`, `missing_required_parameter`,
`invalid_type`, `invalid_value`, `integer_below_min_value`, ...). A JSON `null` counts as absent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.mock_upstream.errors import UpstreamError, invalid
from gateway.mock_upstream.models import MODELS, RETIRED, Family
from gateway.mock_upstream.options import Flavor

_FIELDS = frozenset(
    {
        "prompt", "model", "n", "size", "quality", "background", "moderation", "output_format",
        "output_compression", "partial_images", "stream", "user", "safety_identifier",
    }
)  # fmt: skip
_DALL_E_ONLY = ("response_format", "style")  # GPT image models answer `unknown_parameter`
_GPT_IMAGE_ONLY = (
    "background",
    "moderation",
    "output_format",
    "output_compression",
    "stream",
    "partial_images",
)
_DO_REQUIRED = ("prompt", "model", "n", "size")
STANDARD_SIZES = ("1024x1024", "1024x1536", "1536x1024")
DO_SIZES = ("auto", "1536x1024", "1024x1536")
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")
_MIN_PIXELS, _MAX_PIXELS, _MAX_EDGE = 655_360, 8_294_400, 3840
MAX_PROMPT_CHARS = 32_000


@dataclass(frozen=True, slots=True)
class Generation:
    """A valid request with every default and `auto` resolved to what the upstream would pick."""

    model: str
    family: Family
    prompt: str
    n: int
    width: int
    height: int
    quality: str  # low | medium | high
    background: str  # opaque | transparent
    output_format: str  # png | jpeg | webp
    stream: bool
    partial_images: int
    events: str = "image_generation"  # the stream's event prefix: image_edit for an edit
    image_in: int = 0  # input image tokens (edits)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


EDIT_FIELDS = (_FIELDS - {"moderation"}) | {"input_fidelity"}


def validate(body: dict[str, Any], flavor: Flavor, fields: frozenset[str] = _FIELDS) -> Generation:
    """Check `body` as `flavor`'s upstream would; raise `UpstreamError` with its first complaint.
    `fields` are those the endpoint takes (an edit's differ from a generation's)."""
    _check_fields(body, flavor, fields)
    prompt = _prompt(body)
    model, family = _model(body, flavor)
    for name in _DALL_E_ONLY:
        if _given(body, name):
            raise invalid(name, f"Unknown parameter: '{name}'.", "unknown_parameter")
    n = _int(body, "n", 1, 1, 1 if flavor == "digitalocean" else 10)
    if flavor == "digitalocean":  # its API reference lists these three, and n=1 only
        _choice(body, "size", DO_SIZES, "auto")
    width, height = _size(_str(body, "size", "auto"), family)
    quality = _choice(body, "quality", ("low", "medium", "high", "auto"), "auto")
    background = _choice(body, "background", ("transparent", "opaque", "auto"), "auto")
    _choice(body, "moderation", ("low", "auto"), "auto")
    output_format = _choice(body, "output_format", ("png", "jpeg", "webp"), "png")
    stream = _bool(body, "stream")
    partial_images = _int(body, "partial_images", 0, 0, 3)
    _check_compression(body, output_format)
    _check_background(background, output_format, model, family)
    _check_user(body)
    if flavor == "digitalocean" and stream and partial_images == 0:
        raise invalid("partial_images", "When stream is true, partial_images must be greater than 0.")
    return Generation(
        model=model,
        family=family,
        prompt=prompt,
        n=n,
        width=width,
        height=height,
        quality="medium" if quality == "auto" else quality,
        background="transparent" if background == "transparent" else "opaque",
        output_format=output_format,
        stream=stream,
        partial_images=partial_images if stream else 0,
    )


def _given(body: dict[str, Any], name: str) -> bool:
    return body.get(name) is not None


def _missing(name: str) -> UpstreamError:
    return invalid(name, f"Missing required parameter: '{name}'.", "missing_required_parameter")


def _check_fields(body: dict[str, Any], flavor: Flavor, fields: frozenset[str]) -> None:
    for name in body:
        if name not in fields and name not in _DALL_E_ONLY:
            raise invalid(name, f"Unknown parameter: '{name}'.", "unknown_parameter")
    if flavor == "digitalocean":
        for name in _DO_REQUIRED:
            if not _given(body, name):
                raise _missing(name)


def _type_error(name: str, expected: str, value: Any) -> UpstreamError:
    got = {bool: "a boolean", int: "an integer", float: "a decimal", str: "a string", list: "an array"}
    kind = got.get(type(value), "an object")
    message = f"Invalid type for '{name}': expected {expected}, but got {kind} instead."
    return invalid(name, message, "invalid_type")


def _str(body: dict[str, Any], name: str, default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    return value


def _int(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    if value < low:
        message = (
            f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but got {value}."
        )
        raise invalid(name, message, "integer_below_min_value")
    if value > high:
        message = (
            f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, but got {value}."
        )
        raise invalid(name, message, "integer_above_max_value")
    return value


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _type_error(name, "a boolean", value)
    return value


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = _str(body, name, default)
    if value not in allowed:
        listed = ", ".join(f"'{a}'" for a in allowed[:-1]) + f", and '{allowed[-1]}'"
        raise invalid(name, f"Invalid value: '{value}'. Supported values are: {listed}.")
    return value


def _prompt(body: dict[str, Any]) -> str:
    if "prompt" not in body or body["prompt"] is None:
        raise _missing("prompt")
    prompt = _str(body, "prompt", "")
    if not prompt:
        message = "Invalid 'prompt': empty string. Expected a string with minimum length 1."
        raise invalid("prompt", message, "empty_string")
    if len(prompt) > MAX_PROMPT_CHARS:
        message = (
            f"Invalid 'prompt': string too long. Expected a string with maximum length {MAX_PROMPT_CHARS}, "
            f"but got a string with length {len(prompt)} instead."
        )
        raise invalid("prompt", message, "string_above_max_length")
    return prompt


def _model(body: dict[str, Any], flavor: Flavor) -> tuple[str, Family]:
    model = _str(body, "model", "")
    if not model:  # OpenAI's default is dall-e-2, or gpt-image-1 when a GPT-image-only field is present
        model = "gpt-image-1" if any(_given(body, name) for name in _GPT_IMAGE_ONLY) else "dall-e-2"
    family = MODELS[flavor].get(model)
    if family is not None:
        return model, family
    if flavor == "openai" and model in RETIRED:
        message = f"The model `{model}` does not exist or you do not have access to it."
        raise UpstreamError(404, message, code="model_not_found")
    served = ", ".join(f"'{m}'" for m in MODELS[flavor])
    raise invalid("model", f"Invalid value: '{model}'. Supported values are: {served}.")


def _size(value: str, family: Family) -> tuple[int, int]:
    if value == "auto":
        return 1024, 1024
    match = _SIZE.fullmatch(value)
    if match is not None and value in STANDARD_SIZES:
        return int(match[1]), int(match[2])
    if family != "gpt-image-2" or match is None:
        sizes = ", ".join(f"'{s}'" for s in STANDARD_SIZES)
        raise invalid("size", f"Invalid value: '{value}'. Supported values are: {sizes}, and 'auto'.")
    width, height = int(match[1]), int(match[2])
    problem = _arbitrary_size_problem(width, height)
    if problem:
        raise invalid("size", f"Invalid size '{value}': {problem}.")
    return width, height


def _arbitrary_size_problem(width: int, height: int) -> str | None:
    """gpt-image-2's rules for `WxH` sizes (FACTS.md section 1); None when the size is allowed."""
    if width % 16 or height % 16:
        return "width and height must both be divisible by 16"
    if max(width, height) > 3 * min(width, height):
        return "the aspect ratio must be between 1:3 and 3:1"
    if max(width, height) > _MAX_EDGE:
        return f"the longest edge must be at most {_MAX_EDGE} pixels"
    if not _MIN_PIXELS <= width * height <= _MAX_PIXELS:
        return f"the total number of pixels must be between {_MIN_PIXELS} and {_MAX_PIXELS}"
    return None


def _check_compression(body: dict[str, Any], output_format: str) -> None:
    if not _given(body, "output_compression"):
        return
    _int(body, "output_compression", 100, 0, 100)
    if output_format == "png":
        message = "output_compression is only supported for the 'jpeg' and 'webp' output formats."
        raise invalid("output_compression", message)


def _check_background(background: str, output_format: str, model: str, family: Family) -> None:
    if background != "transparent":
        return
    if family == "gpt-image-2":
        raise invalid(
            "background", f"Transparent background is not supported for {model}; use 'opaque' or 'auto'."
        )
    if output_format == "jpeg":
        message = (
            "Transparent background requires an output format that supports transparency ('png' or 'webp')."
        )
        raise invalid("background", message)


def _check_user(body: dict[str, Any]) -> None:
    """`user` and `safety_identifier` (which the SDK documents with no limit of its own) alike."""
    for name in ("user", "safety_identifier"):
        user = _str(body, name, "")
        if len(user) > 256:
            message = f"Invalid '{name}': string too long. Expected at most 256 characters, got {len(user)}."
            raise invalid(name, message, "string_above_max_length")
