"""A cap on request body size, enforced before the body is read into memory.

Written here rather than FastAPI's ``max_body_size`` (Starlette's
``RequestBodyLimitMiddleware``): that one answers a too-large ``Content-Length``
with a plain-text body, replacing whatever the app sends, while every diffq
error carries the JSON ``Error`` body. ``Content-Length`` above the cap is
refused at once; a body without one (chunked) is counted as it streams in
and refused as soon as it passes the cap. Either way the client gets a 413
with diffq's error body, and nothing is parsed or stored.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffq.app.schemas.errors import Error


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: 413 for HTTP request bodies larger than ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return

        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if response_started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is larger than {self.max_bytes} bytes (DIFFQ_MAX_REQUEST_BYTES)"
        error = Error(code="request_too_large", message=message, fields=[])
        response = JSONResponse(error.model_dump(), status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)
