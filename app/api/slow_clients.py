"""Slow clients cannot hold the API's connections: deadlines for a request's headers and body.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but has no deadline for a
request that is being sent: a connection that sends half its headers, or a body one byte a second,
is held for ever. diffq adds the two deadlines in the API process itself, so no proxy is needed:

- headers: ``HeaderDeadline``, uvicorn's own httptools protocol with a timer armed when the
  connection opens and after every response, disarmed when a request's headers are complete. A
  connection that has not sent complete headers by then gets ``408`` and is closed. (uvicorn
  offers no hook before the ASGI app is called, so this is a protocol subclass; it is passed to
  uvicorn as its ``http`` class by ``uvicorn_options``.)
- body: ``BodyDeadline``, ASGI middleware. The whole body must arrive within the deadline, counted
  from the request's start; past it the read raises ``RequestTimeoutError`` (``408``, and the
  connection is closed), whatever the route was doing with it.

``uvicorn_options(settings)`` also caps the connections and requests one process serves at once
(``limit_concurrency``: ``503`` beyond it), and sets the keep-alive timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from diffq.app.core.errors import RequestTimeoutError
from diffq.app.settings import Settings

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)


class HeaderDeadline(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections whose request headers are late."""

    header_timeout: float = 10.0  # set per deployment by ``header_deadline_protocol``

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:  # a pipelined request has its headers
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        body = (
            b'{"code":"request_timeout","message":"the request headers did not arrive within %g s",'
            b'"fields":[]}' % self.header_timeout
        )
        self.transport.write(_TIMEOUT_RESPONSE % (len(body), body))
        self.transport.close()


def header_deadline_protocol(header_timeout: float) -> type[HeaderDeadline]:
    """``HeaderDeadline`` with this deployment's deadline (uvicorn builds protocols from a class)."""
    return type("HeaderDeadline", (HeaderDeadline,), {"header_timeout": header_timeout})


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The limits and timeouts ``diffq api`` gives uvicorn."""
    return {
        "http": header_deadline_protocol(settings.http_header_timeout),
        "timeout_keep_alive": settings.http_keep_alive,
        "limit_concurrency": settings.http_max_connections,
    }


class BodyDeadline:
    """ASGI middleware: a request's whole body must arrive within ``timeout`` seconds of its start."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout
        complete = False

        async def receive_in_time() -> Message:
            nonlocal complete
            if complete:  # the body is in: later receives wait for a disconnect, for as long as they like
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeoutError(self.timeout) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, receive_in_time, send)


def _has_body(scope: Scope) -> bool:
    headers = dict(scope["headers"])
    return b"transfer-encoding" in headers or headers.get(b"content-length", b"0") not in (b"0", b"")
