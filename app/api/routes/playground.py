"""``/``: the playground, a static page (``app/static``) that drives the public API from a browser."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, PlainTextResponse, Response

STATIC = Path(__file__).resolve().parent.parent.parent / "static"
"""``app/static``: index.html, playground.js, playground.css (no build step)."""

router = APIRouter(include_in_schema=False)


@router.get("/")
def playground() -> Response:
    index = STATIC / "index.html"
    if not index.exists():  # an install without the package data
        return PlainTextResponse("the playground's files are not installed (app/static)", status_code=404)
    return FileResponse(index, headers={"Cache-Control": "no-cache"})
