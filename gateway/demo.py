"""`gateway demo`: the whole gateway offline in one command, on embedded defaults.

Starts two mock upstreams (OpenAI and DigitalOcean flavours) and the gateway with the memory
store and one ready tenant, then prints the tenant's key and snippets that work as printed: a
generation and an edit of its result, with curl and with the openai SDK; and the usage page's
URL with the admin token to sign in with (both new every run).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from textwrap import dedent

from aiohttp import web

from gateway.config import Settings, parse_settings
from gateway.front.auth import hash_key, new_key
from gateway.mock_upstream import MockOptions, create_mock_app
from gateway.process.server import serve

DEMO_UPSTREAM_KEY = "sk-demo-organisation-key"

DEMO_CONFIG = """
server:
  host: 127.0.0.1
  port: {port}
  ops_port: {ops_port}
  log_format: console
admin:
  token: "{admin_token}"
upstreams:
  openai:
    base_url: {openai_url}
    api_key: {upstream_key}
  digitalocean:
    base_url: {do_url}
    api_key: {upstream_key}
routes:
  gpt-image-1.5: {{upstream: openai}}
  gpt-image-2: {{upstream: openai}}
  gpt-image-1-mini: {{upstream: openai}}
  gpt-image-1: {{upstream: digitalocean, model: openai-gpt-image-1}}
policies:
  standard:
    mode: enforce
    models: [gpt-image-1.5, gpt-image-2, gpt-image-1-mini, gpt-image-1]
    default_model: gpt-image-1.5
    sizes: [1024x1024, 1536x1024, 1024x1536, auto]
    qualities: [low, medium, auto]
    max_n: 2
    moderation: [auto]
    output_formats: [png, jpeg, webp]
    backgrounds: [auto, opaque, transparent]
    stream: true
    max_partial_images: 2
    max_prompt_chars: 4000
tenants:
  demo-team:
    policy: standard
    keys: ["{key_hash}"]
    limits:
      requests_per_minute: 60
      images_per_minute: 30
      tokens_per_minute: 200000
      tokens_per_day: 5000000
      usd_per_day: 50
      usd_per_month: 500
      concurrent_requests: 4
"""


def demo_settings(
    port: int, openai_url: str, do_url: str, key: str, *, admin_token: str, ops_port: int = 0
) -> Settings:
    text = DEMO_CONFIG.format(
        port=port,
        ops_port=ops_port,
        admin_token=admin_token,
        openai_url=openai_url,
        do_url=do_url,
        upstream_key=DEMO_UPSTREAM_KEY,
        key_hash=hash_key(key),
    )
    return parse_settings(text, "<demo>", environ={})


def banner(url: str, key: str, ops_url: str, admin_token: str) -> str:
    """Snippets start at column 0 so that they paste into a shell as printed."""
    return dedent(
        f"""
        ================================================================
        Image gateway demo is running at {url}  (Ctrl-C stops it)
        Tenant: demo-team    key: {key}  (a new key every run)

        curl:
        """
    ) + dedent(
        f"""\
        curl -s {url}/v1/images/generations \\
          -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
          -d '{{"model": "gpt-image-1.5", "prompt": "a kite", "size": "1024x1024", "quality": "low"}}' \\
          | head -c 300; echo

        Python (the project's .venv has the openai package):
        .venv/bin/python - <<'PY'
        import base64
        from openai import OpenAI
        client = OpenAI(base_url="{url}/v1", api_key="{key}")
        img = client.images.generate(model="gpt-image-1.5", prompt="a lighthouse at dusk",
                                     size="1024x1024", quality="low")
        open("lighthouse.png", "wb").write(base64.b64decode(img.data[0].b64_json))
        print("saved lighthouse.png", img.usage)
        PY

        Edit it (needs lighthouse.png from the Python example), with curl and with Python:
        curl -s {url}/v1/images/edits -H "Authorization: Bearer {key}" \\
          -F model=gpt-image-1.5 -F prompt="the same lighthouse at night" -F quality=low \\
          -F "image[]=@lighthouse.png;type=image/png" | head -c 300; echo

        .venv/bin/python - <<'PY'
        import base64
        from openai import OpenAI
        client = OpenAI(base_url="{url}/v1", api_key="{key}")
        img = client.images.edit(model="gpt-image-1.5", image=[open("lighthouse.png", "rb")],
                                 prompt="the same lighthouse at night", quality="low")
        open("lighthouse-night.png", "wb").write(base64.b64decode(img.data[0].b64_json))
        print("saved lighthouse-night.png", img.usage)
        PY

        Usage page: {url}/admin/ui    admin token: {admin_token}
        Metrics: {ops_url}/metrics     Health: {url}/healthz
        ================================================================
        """
    )


async def _start_mock(flavor: str) -> tuple[web.AppRunner, str]:
    options = MockOptions(
        flavor="digitalocean" if flavor == "digitalocean" else "openai",
        api_key=DEMO_UPSTREAM_KEY,
        latency_ms=200,
        partial_interval_ms=150,
    )
    runner = web.AppRunner(create_mock_app(options), access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


async def run_demo(port: int) -> None:
    openai_runner, openai_url = await _start_mock("openai")
    do_runner, do_url = await _start_mock("digitalocean")
    key, admin_token = new_key(), secrets.token_urlsafe(24)
    with socket.socket() as sock:  # the operations port: any free one, named in the banner
        sock.bind(("127.0.0.1", 0))
        ops_port = int(sock.getsockname()[1])
    settings = demo_settings(port, openai_url, do_url, key, admin_token=admin_token, ops_port=ops_port)
    ops_url = f"http://127.0.0.1:{ops_port}"
    try:
        await serve(settings, on_ready=lambda url: print(banner(url, key, ops_url, admin_token), flush=True))
    finally:
        await asyncio.gather(openai_runner.cleanup(), do_runner.cleanup())
