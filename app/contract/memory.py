"""The memory guard: diffq runs only on a Redis that refuses writes when full rather than evicting.

With any ``maxmemory-policy`` but ``noeviction`` a full Redis silently drops
keys, queued jobs and their records among them. The API and the workers call
``check_policy`` at start and refuse to run on such a Redis unless the
deployment says it knows (``DIFFQ_REDIS_ALLOW_EVICTION``). With
``noeviction`` a full Redis answers writes with ``OOM``, which the API turns
into ``503 redis_full``; every multi-key write is one script or ``MULTI``, so
a refused one leaves nothing half-written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis import Redis

log = logging.getLogger(__name__)

SAFE_POLICY = "noeviction"


class EvictionPolicyError(RuntimeError):
    """Redis may evict keys when full; the message names the fix."""


@dataclass(frozen=True)
class MemoryUse:
    """Redis's memory figures (``INFO memory``); ``max_bytes`` 0: no limit."""

    used_bytes: int
    max_bytes: int
    policy: str


def read(redis: Redis) -> MemoryUse:
    """From ``INFO memory``, which managed Redis services allow where ``CONFIG GET`` is often refused."""
    info = redis.info("memory")
    return MemoryUse(int(info["used_memory"]), int(info.get("maxmemory", 0)), str(info.get("maxmemory_policy", "?")))


def check_policy(redis: Redis, allow_eviction: bool) -> MemoryUse:
    """Raise ``EvictionPolicyError`` if Redis may evict keys and the deployment has not allowed it."""
    use = read(redis)
    if use.policy == SAFE_POLICY:
        return use
    if allow_eviction:
        log.warning(
            "Redis maxmemory-policy is %s: a full Redis may evict queued jobs (allowed by DIFFQ_REDIS_ALLOW_EVICTION)",
            use.policy,
        )
        return use
    raise EvictionPolicyError(
        f"Redis maxmemory-policy is {use.policy!r}: when full it would evict keys, queued jobs and job records "
        f"among them. Set it to noeviction (redis.conf `maxmemory-policy noeviction`, or "
        f"`CONFIG SET maxmemory-policy noeviction`), or set DIFFQ_REDIS_ALLOW_EVICTION=true to start anyway."
    )
