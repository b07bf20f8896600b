"""The built-in chat page: static files shipped inside the package, served without a key.

The files are the same for every visitor and hold no data; the page asks the API for all it
shows, with the key the person types in, so serving them openly reveals nothing about
sessions. The page's policy allows only its own scripts and styles and connections back to
this server: even a reply that got into the DOM as markup could run nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from launcher.proxy.page_policy import PAGE_HEADERS

WEB_DIR = Path(__file__).with_name("web")
ASSETS_PATH = "/web"


class PageFiles(StaticFiles):
    """The page's scripts, styles and icon, with the page's headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


def mount_page(app: FastAPI) -> None:
    """`GET /` (the page; `HEAD /` too, which clients such as Claude Code send to see that
    the server is up) and `/web/*` (its files), both outside the OpenAPI schema."""

    async def page() -> Any:
        return FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)

    app.add_api_route("/", page, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(ASSETS_PATH, PageFiles(directory=WEB_DIR), name="web")
