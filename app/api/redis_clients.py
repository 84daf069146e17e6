"""Every Redis client of an API process, built in one place with pools sized on purpose.

Three pools, so that one kind of work cannot take the connections another needs:

- ``sync``: routes and dependencies that run in the thread pool (most writes).
  Its threads are few (anyio's 40), so ``redis_max_connections`` is enough for all of them.
- ``quick``: short commands from the event loop: the hot paths (the API key check and its rate,
  ``POST /v1/jobs``' one script, ``GET /v1/jobs/{id}``'s one read) and e.g. the last event id
  before a wait. The event loop has no thread count to bound it, so ``AdmittedRedis`` lets at most
  ``redis_max_connections`` commands hold a connection at once; the rest wait their turn.
- ``waits``: blocking reads only (``XREAD BLOCK`` of long polls, event streams and OpenAI-endpoint
  waits), ``redis_wait_connections`` of them; ``diffq.app.api.waits`` admits no more waits than that,
  so a plain read never waits behind a blocking one and the pool is never exhausted by waits.

A pool that is nevertheless out of connections raises redis-py's ``MaxConnectionsError`` at
once, answered ``503 store_busy`` (never "Redis is unreachable": Redis is fine). This module is
the only place the API sizes its Redis clients; how Redis is reached (a URL, or the primary found
through Sentinel) is ``diffq.app.contract.connection``'s business.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, cast

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from diffq.app.contract import connection
from diffq.app.settings import Settings

#: Seconds to connect; short, so a Redis outage is a prompt 503 rather than a hung request.
CONNECT_TIMEOUT = 2
#: Seconds a short command may take.
COMMAND_TIMEOUT = 10
#: Seconds a blocking read's socket waits: far longer than the longest block (diffq.app.api.waiting.POLL_SECONDS).
BLOCKING_TIMEOUT = 30


class AdmittedRedis(AsyncRedis):
    """redis-py's asyncio client, admitting at most ``slots`` commands at once (``admit``): where a
    plain asyncio pool raises ``MaxConnectionsError`` as soon as its connections are in use, a
    command here waits for one, as a thread-pool route waits for a thread."""

    _slots: asyncio.Semaphore | None = None

    def admit(self, slots: int) -> AdmittedRedis:
        self._slots = asyncio.Semaphore(slots)
        return self

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self._slots is None:
            return await super().execute_command(*args, **options)
        async with self._slots:
            return await super().execute_command(*args, **options)


@dataclass(frozen=True)
class ApiRedis:
    """The API process's Redis clients, one pool each."""

    sync: Redis
    quick: AdmittedRedis
    waits: AsyncRedis

    def close(self) -> None:
        self.sync.close()

    async def aclose(self) -> None:
        self.sync.close()
        await self.quick.aclose()
        await self.waits.aclose()


def open_api_redis(settings: Settings) -> ApiRedis:
    """The clients; connections are opened lazily, so the API starts even while Redis is down."""
    short = {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": COMMAND_TIMEOUT,
        "max_connections": settings.redis_max_connections,
    }
    return ApiRedis(
        sync=connection.sync_client(settings, **short),
        quick=cast(AdmittedRedis, connection.async_client(settings, AdmittedRedis, **short)).admit(
            settings.redis_max_connections
        ),
        waits=connection.async_client(
            settings,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=BLOCKING_TIMEOUT,
            max_connections=settings.redis_wait_connections,
        ),
    )
