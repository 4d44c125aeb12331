"""The usage page: `GET /admin/ui` and its two static files, served from the package itself.

No build step and no CDN (a gateway may run with no internet): plain HTML, CSS and JavaScript
in `static/`, read once. The page holds no data and is served without the admin token; it asks
for the token, keeps it in the tab's sessionStorage and sends it as a bearer header to the admin
API (never in a URL or a cookie). A strict Content-Security-Policy allows only the gateway's own
scripts, styles and API calls, and no framing.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from aiohttp import web

_FILES = {
    "": ("index.html", "text/html"),
    "app.js": ("app.js", "text/javascript"),
    "style.css": ("style.css", "text/css"),
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_ROUTE_NAME = "usage-page"


@cache
def _read(name: str) -> bytes:
    return files("gateway.admin").joinpath("static", name).read_bytes()


async def page(request: web.Request) -> web.Response:
    name, content_type = _FILES[request.match_info.get("name", "")]
    return web.Response(body=_read(name), content_type=content_type, charset="utf-8", headers=_HEADERS)


def add_ui_routes(app: web.Application) -> None:
    app.router.add_get("/ui", page, name=_ROUTE_NAME)
    app.router.add_get("/ui/{name:app\\.js|style\\.css}", page, name=_ROUTE_NAME + "-file")


def is_public(request: web.Request) -> bool:
    """The page's own files need no token (they hold no data)."""
    return (request.match_info.route.name or "").startswith(_ROUTE_NAME)
