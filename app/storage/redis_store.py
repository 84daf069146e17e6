"""The ``redis`` backend: objects as Redis strings beside the job state (small setups, ``diffq up``).

Each object expires with its job (the ``ttl`` given at ``put``), so nothing needs sweeping.
This is the old behaviour: every image byte counts against Redis's ``maxmemory``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import redis.exceptions
from redis import Redis

from diffq.app.contract import keys
from diffq.app.storage.base import ListedObject, StorageUnavailableError

_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class RedisResultStore:
    name = "redis"

    def __init__(self, client: Redis) -> None:
        self.redis = client

    def put(self, key: str, data: bytes, content_type: str, ttl: int) -> None:
        try:
            self.redis.set(keys.stored_object(key), data, ex=ttl)
        except _DOWN as error:
            raise StorageUnavailableError(f"Redis is unreachable: {error}") from error

    def get(self, key: str) -> bytes | None:
        try:
            return self.redis.get(keys.stored_object(key))
        except _DOWN as error:
            raise StorageUnavailableError(f"Redis is unreachable: {error}") from error

    def delete(self, names: Iterable[str]) -> None:
        stored = [keys.stored_object(key) for key in names]
        if stored:
            self.redis.delete(*stored)

    def delete_job(self, job_id: str) -> None:
        found = list(self.redis.scan_iter(match=keys.stored_object(f"{job_id}/*"), count=100))
        if found:
            self.redis.delete(*found)

    def list(self) -> Iterator[ListedObject]:
        prefix = keys.stored_object("")
        for name in self.redis.scan_iter(match=f"{prefix}*", count=500):
            yield ListedObject(key=name.decode()[len(prefix) :], modified=0.0)

    def signed_url(self, key: str, seconds: int, content_type: str) -> str | None:
        return None

    def public_path(self, key: str) -> str:
        return key

    def ping(self) -> bool:
        return True  # the job state's own Redis: /readyz reports it as `redis`

    def check(self) -> None:
        return None  # the job state's own Redis: its outages are reported as Redis's
