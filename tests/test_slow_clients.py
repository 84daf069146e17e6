"""Slow clients against a real `diffq api` process over real sockets (issue 19, finding 4): idle
connections, half-sent headers and trickled bodies are dropped within the configured deadlines,
and the API keeps answering everyone else meanwhile."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from diffq.app.embedded_redis import EmbeddedRedis
from tests.services import services

pytestmark = pytest.mark.slow

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
SLACK = 2.0  # scheduling on a busy 2-core machine
HALF_REQUESTS = 100


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=5)


def trickle(sock: socket.socket, data: bytes, every: float, stop: threading.Event) -> None:
    """Send ``data`` one byte at a time until it is sent, the server closes, or ``stop``."""
    for byte in data:
        if stop.wait(every):
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return


def closed_by(sock: socket.socket, deadline: float) -> tuple[float | None, bytes]:
    """When the server closed the connection (None if still open at ``deadline``), and what it sent."""
    received = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            break
        except ConnectionResetError:
            return time.monotonic(), received
        if not chunk:
            return time.monotonic(), received
        received += chunk
    return None, received


def test_idle_half_sent_and_trickled_requests_are_dropped_in_time(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    with services(redis_server.url, tmp_path, DIFFQ_HTTP_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
                  DIFFQ_HTTP_BODY_TIMEOUT=str(BODY_TIMEOUT)) as api:
        stop = threading.Event()
        started = time.monotonic()
        idle = [connect(api.url) for _ in range(20)]  # connect, send nothing
        half = [connect(api.url) for _ in range(HALF_REQUESTS)]
        for sock in half:
            sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        slow_headers, slow_body = connect(api.url), connect(api.url)
        threads = [
            threading.Thread(target=trickle, args=(slow_headers, b"GET /healthz HTTP/1.1\r\nX-A: " + b"a" * 200, 0.1, stop)),
            threading.Thread(target=trickle, args=(slow_body, b"x" * 200, 0.1, stop)),
        ]
        slow_body.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{")
        for thread in threads:
            thread.start()
        try:
            # Meanwhile the API answers a well-behaved client at once.
            assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200

            header_deadline = started + HEADER_TIMEOUT + SLACK
            for sock in [*idle, *half]:
                closed, _ = closed_by(sock, header_deadline)
                assert closed is not None, "a connection without complete headers was still open"
            closed, received = closed_by(slow_headers, header_deadline)
            assert closed is not None and received.startswith(b"HTTP/1.1 408"), received
            closed, received = closed_by(slow_body, started + BODY_TIMEOUT + SLACK)
            assert closed is not None, "a trickled body was still being read"
            assert received.startswith(b"HTTP/1.1 408") and b"request_timeout" in received, received
            assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            for sock in [*idle, *half, slow_headers, slow_body]:
                sock.close()


def test_a_complete_slow_request_within_the_deadlines_is_served(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    with services(redis_server.url, tmp_path, DIFFQ_HTTP_HEADER_TIMEOUT="3", DIFFQ_HTTP_BODY_TIMEOUT="3") as api:
        sock = connect(api.url)
        try:
            for part in (b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
                sock.sendall(part)
                time.sleep(0.3)
            _, received = closed_by(sock, time.monotonic() + 1)
            assert received.startswith(b"HTTP/1.1 200"), received
            # Kept alive: a second request on the same connection is served too.
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            _, again = closed_by(sock, time.monotonic() + 1)
            assert again.startswith(b"HTTP/1.1 200"), again
        finally:
            sock.close()


def test_connections_beyond_the_cap_get_503_at_once(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    with services(redis_server.url, tmp_path, DIFFQ_HTTP_MAX_CONNECTIONS="5", DIFFQ_HTTP_HEADER_TIMEOUT="3") as api:
        held = [connect(api.url) for _ in range(5)]
        try:
            for sock in held:
                sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # half-sent: each holds a connection
            time.sleep(0.3)
            started = time.monotonic()
            refused = httpx.get(f"{api.url}/healthz", timeout=5)
            assert refused.status_code == 503 and time.monotonic() - started < 1.0
        finally:
            for sock in held:
                sock.close()
        assert wait_until_served(api.url)


def wait_until_served(url: str) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
            return True
        time.sleep(0.1)
    return False
