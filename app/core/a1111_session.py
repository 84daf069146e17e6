"""What an API key's AUTOMATIC1111 clients share on ``/sdapi/v1``: their options and their jobs.

A1111 has one global model and one job at a time; diffq has many keys, so
both are per key (per owner: the anonymous ``-`` while auth is off). A key's
``sd_model_checkpoint`` option is its default model; ``progress``,
``interrupt`` and ``skip`` see and touch only the jobs that key made through
``/sdapi/v1``, never another key's, and never its own ``/v1/jobs`` work.
Keys: ``diffq.app.contract.keys.sdapi_options`` and ``sdapi_jobs``.
"""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

from diffq.app.contract import keys

#: Jobs a key's index keeps; ``progress`` and ``interrupt`` look at the newest few only.
MAX_TRACKED = 200
RECENT = 20


class A1111Session:
    """One owner's A1111 options and ``/sdapi/v1`` jobs in Redis."""

    def __init__(self, redis: Redis, owner: str, job_ttl: int) -> None:
        self.redis = redis
        self.owner = owner
        self.job_ttl = job_ttl

    def options(self) -> dict[str, Any]:
        """The options this owner has set (JSON values by name)."""
        stored = self.redis.hgetall(keys.sdapi_options(self.owner))
        return {name.decode(): json.loads(value) for name, value in stored.items()}

    def set_options(self, values: dict[str, Any]) -> None:
        if values:
            encoded = {name: json.dumps(value) for name, value in values.items()}
            self.redis.hset(keys.sdapi_options(self.owner), mapping=encoded)

    def track(self, job_id: str, created_at: float) -> None:
        """Remember a job made through ``/sdapi/v1`` for this owner's ``progress`` and ``interrupt``."""
        index = keys.sdapi_jobs(self.owner)
        with self.redis.pipeline() as pipe:
            pipe.zadd(index, {job_id: created_at})
            pipe.zremrangebyrank(index, 0, -MAX_TRACKED - 1)
            pipe.expire(index, self.job_ttl)
            pipe.execute()

    def recent_jobs(self) -> list[str]:
        """Ids of this owner's newest ``/sdapi/v1`` jobs, newest first."""
        return [raw.decode() for raw in self.redis.zrevrange(keys.sdapi_jobs(self.owner), 0, RECENT - 1)]
