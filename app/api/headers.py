"""Security headers on every response: no MIME sniffing, no framing, no referrer, and a Content
Security Policy that fits what is served.

- API responses (JSON, PNG, event streams): ``default-src 'none'``: nothing in them may load or
  run anything if a browser is tricked into rendering one.
- The playground (``/`` and ``/static``): its own origin only (its script, style, and the job
  images it shows); no inline script, no framing, no form posts elsewhere.
- The interactive docs (``/docs``, ``/redoc``) load FastAPI's Swagger UI and ReDoc from their CDN,
  so they get only ``frame-ancestors 'none'``.

A header the route set itself is left alone.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
PLAYGROUND_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; connect-src 'self' blob:; object-src 'none'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
DOCS_POLICY = "frame-ancestors 'none'"
DOCS_PATHS = ("/docs", "/redoc")

COMMON = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def policy_for(path: str) -> str:
    if path == "/" or path.startswith("/static/"):
        return PLAYGROUND_POLICY
    if path.startswith(DOCS_PATHS):
        return DOCS_POLICY
    return API_POLICY


class SecurityHeaders:
    """ASGI middleware adding ``COMMON`` and the path's Content-Security-Policy."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = policy_for(scope["path"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in {**COMMON, "Content-Security-Policy": policy}.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
