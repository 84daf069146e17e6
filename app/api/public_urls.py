"""Absolute URLs the API hands out (``Location``, image, preview and journey URLs).

With ``DIFFQ_PUBLIC_URL`` set they are built on it, whatever ``Host`` header a request carried (a
client, or anything between it and the API, cannot make diffq hand out links to another host);
unset, on the request's own base URL, as Starlette's ``url_for`` does.
"""

from __future__ import annotations

import re
from weakref import WeakKeyDictionary

from fastapi import FastAPI, Request

#: Parameter values a path template may take as they are (what the router would write unchanged).
_PLAIN = re.compile(r"[A-Za-z0-9_.~-]+")
_templates: WeakKeyDictionary[FastAPI, dict[tuple[str, tuple[str, ...]], str]] = WeakKeyDictionary()


def public_url(request: Request, name: str, **params: str) -> str:
    """The absolute URL of route ``name`` with ``params``."""
    base: str | None = request.app.state.settings.public_url
    if not base:
        base = str(request.base_url)
    return base.rstrip("/") + _path(request.app, name, params)


def _path(app: FastAPI, name: str, params: dict[str, str]) -> str:
    """``app.url_path_for(name, **params)``; the router's search (a walk of every route, an
    exception per miss) is done once per route name, then its path is filled in."""
    if not all(_PLAIN.fullmatch(str(value)) for value in params.values()):
        return str(app.url_path_for(name, **params))
    known = _templates.setdefault(app, {})
    shape = (name, tuple(sorted(params)))
    template = known.get(shape)
    if template is None:
        template = known[shape] = str(app.url_path_for(name, **{key: f"{{{key}}}" for key in params}))
    return template.format(**params)
