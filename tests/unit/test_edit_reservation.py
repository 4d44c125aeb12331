"""Property: an edit's reservation is never below what the mock upstream reports for it.

Random models, input images (sizes, counts), fidelities, qualities, sizes, n and streaming: the
engine decides, `policies.cost.estimate` reserves, and the mock validates the same multipart fields
and files and computes `usage` by the documented rule. Text, input image and output tokens each.
"""

from __future__ import annotations

import io
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gateway.mock_upstream.edits import Form, validate_edit
from gateway.mock_upstream.models import usage
from gateway.mock_upstream.options import ReceivedFile
from gateway.mock_upstream.validation import Generation
from policies.cost import estimate
from policies.engine import evaluate
from policies.rules import Policy
from policies.uploads import InputImage, Inputs
from tests.unit.policies.world import CATALOG, ROUTES

MODELS = ["gpt-image-1.5", "gpt-image-1-mini", "gpt-image-2", "chatgpt-image-latest"]
FIDELITY = {"gpt-image-1.5": [None, "low", "high"], "gpt-image-1-mini": [None, "low"], "gpt-image-2": [None]}


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG", compress_level=0)
    return buffer.getvalue()


@st.composite
def edits(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    model = draw(st.sampled_from(MODELS))
    dims = draw(st.lists(st.tuples(st.integers(16, 4096), st.integers(16, 4096)), min_size=1, max_size=4))
    fields: dict[str, Any] = {
        "model": model,
        "prompt": draw(st.text(min_size=1, max_size=40).filter(str.strip)),
    }
    fidelity = draw(st.sampled_from(FIDELITY.get(model, [None, "low", "high"])))
    if fidelity is not None:
        fields["input_fidelity"] = fidelity
    fields["quality"] = draw(st.sampled_from(["low", "medium", "high", "auto"]))
    fields["size"] = draw(st.sampled_from(["1024x1024", "1536x1024", "1024x1536", "auto"]))
    fields["n"] = draw(st.integers(1, 3))
    if draw(st.booleans()):
        fields["stream"] = True
        fields["partial_images"] = draw(st.integers(0, 3))
    return fields, dims


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits())
def test_an_edit_is_never_reserved_below_what_the_mock_reports(
    case: tuple[dict[str, Any], list[tuple[int, int]]],
) -> None:
    fields, dims = case
    inputs = Inputs(
        "edit", tuple(InputImage("image[]", "x.png", "image/png", "png", w, h, 1) for w, h in dims)
    )
    decision = evaluate(Policy(), CATALOG, ROUTES, fields, inputs)
    assert decision.allowed and decision.entry is not None, decision.error
    reserved = estimate(decision.body, decision.entry, inputs)
    text = {k: "true" if v is True else str(v) for k, v in decision.body.items()}
    files = [ReceivedFile("image[]", "x.png", "image/png", png(w, h)) for w, h in dims]
    gen = validate_edit(Form(text, files), "openai", serve_dall_e_2=False)
    assert isinstance(gen, Generation)
    reported = usage(
        gen.family,
        gen.width,
        gen.height,
        gen.quality,
        n=gen.n,
        prompt=gen.prompt,
        partial_images=gen.partial_images,
        image_in=gen.image_in,
    )
    assert reserved.image_in_tokens >= reported["input_tokens_details"]["image_tokens"] > 0
    assert reserved.text_in_tokens >= reported["input_tokens_details"]["text_tokens"]
    assert reserved.image_out_tokens >= reported["output_tokens"]
    assert reserved.tokens >= reported["total_tokens"]
