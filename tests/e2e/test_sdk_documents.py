"""What the official SDK sends, as its documents describe it, through the gateway to the mock upstream.

openai-python 3.63's parameter documents (types/image_*_params.py) and the API references in
/work/shared/reference are the contract: a request they call valid is served, and what they call
invalid is refused with a clear OpenAI-style 400 before anything is sent upstream.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestServer

from gateway.config import Settings
from gateway.mock_upstream import RECEIVED
from tests.e2e.conftest import Running, StartGateway, base_url
from tests.e2e.test_edits import image_bytes, sdk
from tests.support.config import config_dict
from tests.support.images import noise_png


async def start(start_gateway: StartGateway, mock: TestServer, **team: Any) -> Running:
    """The gateway in front of `mock`, tenant `team` given the extra settings `team`."""
    config = config_dict(base_url(mock), policy=team.pop("policy", None))
    config["tenants"]["team"].update(team)
    return await start_gateway(Settings.model_validate(config))


# --- safety_identifier ------------------------------------------------------------------------------


async def test_safety_identifier_is_forwarded_unchanged_on_generations_and_edits(
    start_gateway: StartGateway, mock_openai: TestServer
) -> None:
    """The SDK's successor to the deprecated `user`: accepted and sent upstream as written."""
    gw = await start(start_gateway, mock_openai)
    client = sdk(gw)
    made = await asyncio.to_thread(
        client.images.generate,
        model="gpt-image-1.5",
        prompt="a red fox",
        quality="low",
        safety_identifier="sha256-of-alice",
        user="alice@example.com",
    )
    edited = await asyncio.to_thread(
        client.images.edit,
        model="gpt-image-1.5",
        image=("room.png", image_bytes(256, 256), "image/png"),
        prompt="in blue",
        quality="low",
        safety_identifier="sha256-of-alice",
    )
    assert made.data and edited.data
    generation, edit = mock_openai.app[RECEIVED]
    assert (generation.body["safety_identifier"], generation.body["user"]) == (
        "sha256-of-alice",
        "alice@example.com",
    )
    assert edit.body["safety_identifier"] == "sha256-of-alice"


async def test_safety_identifier_is_bounded_like_user(
    start_gateway: StartGateway, mock_openai: TestServer
) -> None:
    gw = await start(start_gateway, mock_openai)
    with pytest.raises(openai.BadRequestError) as refused:
        await asyncio.to_thread(
            sdk(gw).images.generate, model="gpt-image-1.5", prompt="x", safety_identifier="s" * 257
        )
    assert refused.value.param == "safety_identifier" and "256" in refused.value.message
    assert mock_openai.app[RECEIVED] == []


async def test_the_end_user_is_the_safety_identifier_else_the_user(
    start_gateway: StartGateway, mock_openai: TestServer
) -> None:
    """`require_user` and `user_limits` name the end user as the API does: a non-empty
    `safety_identifier` takes precedence over `user`, which counts when it is empty or absent."""
    gw = await start(
        start_gateway,
        mock_openai,
        policy={"default_model": "gpt-image-1.5", "require_user": True},
        user_limits={"requests_per_minute": 1},
    )
    client = sdk(gw)

    def generate(**who: str) -> Any:
        return client.images.generate(prompt="x", quality="low", **who)

    await asyncio.to_thread(generate, safety_identifier="alice", user="shared-service-account")
    # the same end user, whatever `user` says: its one request a minute is spent
    with pytest.raises(openai.RateLimitError):
        await asyncio.to_thread(generate, safety_identifier="alice", user="another-account")
    # another end user behind the same `user`
    await asyncio.to_thread(generate, safety_identifier="bob", user="shared-service-account")
    # an empty safety_identifier: the API uses `user`
    await asyncio.to_thread(generate, safety_identifier="", user="carol")
    with pytest.raises(openai.RateLimitError):
        await asyncio.to_thread(generate, user="carol")
    with pytest.raises(openai.PermissionDeniedError) as anonymous:  # no end user at all
        await asyncio.to_thread(generate, safety_identifier="")
    assert anonymous.value.code == "policy_violation"
    assert len(mock_openai.app[RECEIVED]) == 3


# --- dall-e clients and response_format ----------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "fields"),
    [
        ("generate", {"model": "dall-e-3"}),  # response_format omitted: the documented default is url
        ("generate", {"model": "dall-e-3", "response_format": "url"}),
        ("generate", {}),  # no model either: OpenAI's implicit dall-e-2
        ("edit", {}),  # an edit without model is dall-e-2's too
    ],
)
async def test_a_dall_e_client_that_would_read_a_url_gets_a_400_saying_to_send_b64_json(
    start_gateway: StartGateway, mock_openai: TestServer, call: str, fields: dict[str, Any]
) -> None:
    """dall-e-2/3 return a URL by default; their GPT image replacements return base64 only. An
    unchanged dall-e client would be billed and read `data[0].url == None`: it is refused instead,
    before anything is sent, with the fix in the message."""
    gw = await start(start_gateway, mock_openai, policy={})  # no default_model: OpenAI's rule
    images = sdk(gw).images
    send: Any = (
        functools.partial(images.generate, prompt="a red fox", **fields)
        if call == "generate"
        else functools.partial(
            images.edit, image=("a.png", image_bytes(256, 256), "image/png"), prompt="blue", **fields
        )
    )
    with pytest.raises(openai.BadRequestError) as refused:
        await asyncio.to_thread(send)
    assert (refused.value.param, refused.value.code) == ("response_format", "invalid_value")
    assert "response_format='b64_json'" in refused.value.message
    assert mock_openai.app[RECEIVED] == []
    served = await asyncio.to_thread(functools.partial(send, response_format="b64_json"))
    assert served.data is not None and served.data[0].b64_json is not None


# --- the mask's own bound -------------------------------------------------------------------------


async def test_a_mask_over_4_mib_is_refused_before_anything_is_sent(
    start_gateway: StartGateway, mock_openai: TestServer
) -> None:
    """The SDK's `mask`: "a valid PNG file, less than 4MB", though each image may be up to 50 MB."""
    gw = await start(start_gateway, mock_openai)
    mask = noise_png(1100, 1100)
    assert len(mask) > 4 * 2**20
    with pytest.raises(openai.BadRequestError) as refused:
        await asyncio.to_thread(
            sdk(gw).images.edit,
            model="gpt-image-1.5",
            image=("room.png", image_bytes(1100, 1100), "image/png"),
            mask=("mask.png", mask, "image/png"),
            prompt="in blue",
        )
    assert (refused.value.param, refused.value.code) == ("mask", "invalid_value")
    assert f"is {len(mask)} bytes; gpt-image-1.5 takes a mask under 4194304 bytes" in refused.value.message
    assert mock_openai.app[RECEIVED] == []


# --- prompts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [" ", "\n\t  "])
async def test_a_whitespace_prompt_is_a_prompt(
    start_gateway: StartGateway, mock_openai: TestServer, prompt: str
) -> None:
    """The documents ask only for a length of at least 1 (001: minLength 1); the upstream decides
    what a blank prompt draws. Forwarded as sent, for generations and edits alike."""
    gw = await start(start_gateway, mock_openai)
    client = sdk(gw)
    made = await asyncio.to_thread(
        client.images.generate, model="gpt-image-1.5", prompt=prompt, quality="low"
    )
    edited = await asyncio.to_thread(
        client.images.edit,
        model="gpt-image-1.5",
        image=("room.png", image_bytes(256, 256), "image/png"),
        prompt=prompt,
        quality="low",
    )
    assert made.data and edited.data
    assert [sent.body["prompt"] for sent in mock_openai.app[RECEIVED]] == [prompt, prompt]
    with pytest.raises(openai.BadRequestError) as empty:  # the empty prompt stays refused
        await asyncio.to_thread(client.images.generate, model="gpt-image-1.5", prompt="")
    assert empty.value.param == "prompt"
