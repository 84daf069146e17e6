"""diffq.app.contract.connection: a plain URL as before, or the primary found through real sentinels,
followed across a failover by the same client objects (sync and asyncio) and by `diffq keys`."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError

from diffq.app.contract import connection
from diffq.app.embedded_redis import EmbeddedRedis
from diffq.app.settings import Settings
from tests.helpers import clean_environment, diffq_command
from tests.redis_ha import SERVICE, SentinelCluster


def test_a_plain_url_builds_a_plain_client(redis_server: EmbeddedRedis) -> None:
    settings = Settings(_env_file=None, redis_url=redis_server.url)
    client = connection.sync_client(settings, socket_timeout=3)
    assert client.connection_pool.connection_kwargs["port"] == redis_server.port
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 3
    assert client.ping()
    client.close()


def test_sentinels_must_be_host_port_pairs() -> None:
    assert connection.parse_sentinels("a:26379, b:26380,") == [("a", 26379), ("b", 26380)]
    assert connection.parse_sentinels("[::1]:26379") == [("::1", 26379)]
    for bad in ("a", "a:", ":1", "a:99999", "a:port"):
        with pytest.raises(ValueError, match="host:port"):
            connection.parse_sentinels(bad)
    with pytest.raises(ValueError, match="redis_sentinels"):
        Settings(_env_file=None, redis_sentinels="sentinel-1")


def test_with_sentinels_the_url_gives_only_credentials_database_and_tls() -> None:
    settings = Settings(_env_file=None, redis_url="rediss://u:p@ignored:1/3?ssl_ca_certs=/ca.crt",
                        redis_sentinels="127.0.0.1:26379", redis_sentinel_password="sp", redis_sentinel_tls=True)
    client = connection.sync_client(settings, socket_timeout=2)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"], kwargs["ssl_ca_certs"]) == ("u", "p", 3, "/ca.crt")
    assert "host" not in kwargs and client.connection_pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    [sentinel] = client.connection_pool.sentinel_manager.sentinels
    sentinel_kwargs = sentinel.connection_pool.connection_kwargs
    assert (sentinel_kwargs["password"], sentinel_kwargs["ssl_ca_certs"], sentinel_kwargs["socket_timeout"]) == ("sp", "/ca.crt", 2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[SentinelCluster]:
    started = SentinelCluster().start()
    yield started
    started.stop()


def _eventually(write, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            return write()
        except (RedisConnectionError, ReadOnlyError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.slow
def test_clients_follow_a_failover_without_being_rebuilt(cluster: SentinelCluster) -> None:
    settings = Settings(_env_file=None, redis_url="redis://127.0.0.1:1/0", redis_sentinels=cluster.addresses,
                        redis_sentinel_service=SERVICE)
    sync = connection.sync_client(settings, socket_connect_timeout=1, socket_timeout=2)
    asynchronous = connection.async_client(settings, socket_connect_timeout=1, socket_timeout=2)

    async def scenario() -> int:
        before = cluster.primary()
        sync.set("diffq:test:sync", "before")
        await asynchronous.set("diffq:test:async", "before")
        _, after, _, _ = await asyncio.to_thread(cluster.fail_over)
        assert after.port != before.port
        _eventually(lambda: sync.set("diffq:test:sync", "after"))
        deadline = time.monotonic() + 60
        while True:
            try:
                await asynchronous.set("diffq:test:async", "after")
                break
            except (RedisConnectionError, ReadOnlyError):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        await asynchronous.aclose()
        return after.port

    after_port = asyncio.run(scenario())
    after = next(node for node in cluster.nodes if node.port == after_port)
    with Redis(port=after.port) as primary:
        assert primary.mget("diffq:test:sync", "diffq:test:async") == [b"after", b"after"]
    sync.close()

    env = clean_environment(DIFFQ_REDIS_URL="redis://127.0.0.1:1/0", DIFFQ_REDIS_SENTINELS=cluster.addresses,
                            DIFFQ_REDIS_SENTINEL_SERVICE=SERVICE)
    created = subprocess.run([*diffq_command(), "keys", "create", "--name", "via-sentinel"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    with Redis(port=after.port) as primary:
        assert primary.scard("diffq:apikeys") == 1
