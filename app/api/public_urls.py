"""Absolute URLs the API hands out (``Location``, image, preview and journey URLs).

With ``DIFFQ_PUBLIC_URL`` set they are built on it, whatever ``Host`` header a request carried (a
client, or anything between it and the API, cannot make diffq hand out links to another host);
unset, on the request's own base URL, as Starlette's ``url_for`` does.
"""

from __future__ import annotations

from fastapi import Request


def public_url(request: Request, name: str, **params: str) -> str:
    """The absolute URL of route ``name`` with ``params``."""
    base: str | None = request.app.state.settings.public_url
    if not base:
        return str(request.url_for(name, **params))
    return base.rstrip("/") + str(request.app.url_path_for(name, **params))
