"""The browser playground: one static page that orcd serves itself at ``GET /``.

``index.html``, ``app.js`` and ``style.css`` sit beside this module (package data; no build
step, nothing loaded from elsewhere). The page talks to the worker's own routes
(``POST /execute``, ``POST /cancel``, ``GET /jobs``, ``GET /health``) with ``fetch``; it has
no route of its own beyond its files, and holds no data, so it needs no token to load.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from quart import Response
from quart_trio import QuartTrio

if TYPE_CHECKING:
    from ..server import Worker

# route -> (file, content type)
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}

# Everything the page loads or calls is on this origin.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def register(app: QuartTrio, worker: Worker) -> None:
    """Serve the playground's files (read once, here) on ``GET /`` and ``GET /ui/...``."""
    folder = resources.files(__name__)
    for route, (name, content_type) in ASSETS.items():
        body = folder.joinpath(name).read_bytes()

        async def serve(body: bytes = body, content_type: str = content_type) -> Response:
            response = Response(body, status=200, content_type=content_type)
            response.headers["Cache-Control"] = "no-cache"
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Content-Security-Policy"] = CSP
            return response

        app.add_url_rule(route, f"web_{name}", serve, methods=["GET"])
