"""Every Redis client diffq opens, built in this one place.

Without sentinels (``DIFFQ_REDIS_SENTINELS`` empty) a client is exactly
``Redis.from_url(DIFFQ_REDIS_URL)``. With them, it is redis-py's
Sentinel-managed client for the master ``DIFFQ_REDIS_SENTINEL_SERVICE``: each
new connection asks the sentinels where the primary is, and a connection to a
primary that was demoted (``READONLY``) or died is dropped, so the next
command goes to the promoted replica without a restart. The URL then only
supplies the primary's username, password, database and TLS options.
"""

from __future__ import annotations

from typing import Any, Protocol

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.connection import SSLConnection, parse_url
from redis.sentinel import Sentinel


class RedisSettings(Protocol):
    """Where Redis is: the fields of the deployment's settings (``diffq.app.settings.Settings``) this module
    reads, so that the contract does not import the API's settings."""

    @property
    def redis_url(self) -> str: ...
    @property
    def redis_sentinels(self) -> str: ...
    @property
    def redis_sentinel_service(self) -> str: ...
    @property
    def redis_sentinel_password(self) -> str | None: ...
    @property
    def redis_sentinel_tls(self) -> bool: ...


#: URL fields that address one server; Sentinel decides those.
_ADDRESS = ("host", "port", "path", "connection_class")


def parse_sentinels(text: str) -> list[tuple[str, int]]:
    """``"h1:26379,h2:26379"`` as (host, port) pairs; ValueError names a malformed entry."""
    found = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        host, _, port = entry.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"sentinel {entry!r} is not host:port (e.g. sentinel-1:26379)")
        found.append((host.strip("[]"), int(port)))
    return found


def uses_sentinel(settings: RedisSettings) -> bool:
    return bool(parse_sentinels(settings.redis_sentinels))


def sync_client(settings: RedisSettings, **options: Any) -> Redis:
    """A client for the primary; ``options`` (socket timeouts...) as ``Redis.from_url`` takes them."""
    if not uses_sentinel(settings):
        return Redis.from_url(settings.redis_url, **options)
    sentinel = Sentinel(parse_sentinels(settings.redis_sentinels), sentinel_kwargs=_sentinel_kwargs(settings, options))
    return sentinel.master_for(settings.redis_sentinel_service, redis_class=Redis, **_primary_kwargs(settings, options))


def async_client(settings: RedisSettings, redis_class: type[AsyncRedis] = AsyncRedis, **options: Any) -> AsyncRedis:
    """The asyncio twin of ``sync_client``; ``redis_class``: a subclass of redis-py's asyncio client to build."""
    if not uses_sentinel(settings):
        return redis_class.from_url(settings.redis_url, **options)
    sentinel = AsyncSentinel(
        parse_sentinels(settings.redis_sentinels), sentinel_kwargs=_sentinel_kwargs(settings, options)
    )
    return sentinel.master_for(
        settings.redis_sentinel_service, redis_class=redis_class, **_primary_kwargs(settings, options)
    )


def describe(settings: RedisSettings) -> str:
    """Where the clients point, without secrets (for start-up log lines)."""
    if not uses_sentinel(settings):
        parts = parse_url(settings.redis_url)
        return f"Redis at {parts.get('host', '?')}:{parts.get('port', 6379)}"
    return f"Redis primary {settings.redis_sentinel_service!r} via sentinels {settings.redis_sentinels}"


def _primary_kwargs(settings: RedisSettings, options: dict[str, Any]) -> dict[str, Any]:
    kwargs = parse_url(settings.redis_url)
    tls = kwargs.get("connection_class") is SSLConnection
    kwargs = {name: value for name, value in kwargs.items() if name not in _ADDRESS}
    return {**kwargs, **options, **({"ssl": True} if tls else {})}


def _sentinel_kwargs(settings: RedisSettings, options: dict[str, Any]) -> dict[str, Any]:
    """How to reach the sentinels: their own password; TLS with the primary's CA options."""
    kwargs: dict[str, Any] = {name: value for name, value in options.items() if name.startswith("socket_")}
    if settings.redis_sentinel_password:
        kwargs["password"] = settings.redis_sentinel_password
    if settings.redis_sentinel_tls:
        tls = {name: value for name, value in parse_url(settings.redis_url).items() if name.startswith("ssl_")}
        kwargs.update(ssl=True, **tls)
    return kwargs
