"""Per-key quotas kept in Redis, so every API process enforces the same ones.

- Request rate: the ``limits`` package's sliding-window counter (two Redis counters a key),
  answered with ``RateLimit-*`` headers on every response and ``429`` + ``Retry-After`` past it.
- Queued jobs: a set of the key's queued job ids, checked and added to in one script.
- Open event streams: a sorted set of stream claims that lapse unless renewed, so a crashed
  API process cannot hold a key's streams for ever.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from redis import Redis

from app.contract import keys

#: Seconds an event stream's claim lasts unless its stream renews it.
STREAM_CLAIM_SECONDS = 60


@dataclass(frozen=True)
class RateDecision:
    """One request counted against a key's rate: allowed or not, and the headers that say so."""

    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int
    window_seconds: int

    def headers(self) -> dict[str, str]:
        """``RateLimit-*`` headers (IETF draft ``draft-ietf-httpapi-ratelimit-headers``), and
        ``Retry-After`` when refused."""
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
            "RateLimit-Policy": f"{self.limit};w={self.window_seconds}",
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, self.reset_seconds))
        return headers


def parse_rate(text: str) -> RateLimitItem:
    """``"50/second"``, ``"1000/minute"``, ``"10 per 2 seconds"`` ...; ``ValueError`` otherwise."""
    try:
        return parse(text)
    except Exception as error:  # limits raises its own ValueError subclasses
        raise ValueError(f'{text!r} is not a rate; write e.g. "50/second" or "1000/minute" ({error})') from None


class RateLimiter:
    """Counts requests per key id in Redis."""

    def __init__(self, redis: Redis) -> None:
        storage = RedisStorage("redis://", connection_pool=redis.connection_pool, key_prefix=keys.RATE_LIMIT_PREFIX)
        self._limiter = SlidingWindowCounterRateLimiter(storage)

    def hit(self, key_id: str, rate: str) -> RateDecision:
        item = parse_rate(rate)
        allowed = self._limiter.hit(item, key_id)
        stats = self._limiter.get_window_stats(item, key_id)
        reset = max(0, math.ceil(stats.reset_time - time.time()))
        return RateDecision(allowed, item.amount, max(0, stats.remaining), reset, item.get_expiry())


# KEYS[1]: the owner's queued set. ARGV: job id, cap, job-record key prefix, TTL.
# Below the cap: add the job. At the cap: first drop ids whose record is no longer queued
# (ended, running, deleted, expired), then decide. Returns 1 if added, 0 if the cap is reached.
_RESERVE_QUEUED = """
local cap = tonumber(ARGV[2])
if redis.call('SCARD', KEYS[1]) >= cap then
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    if redis.call('HGET', ARGV[3] .. id, 'status') ~= '"queued"' then
      redis.call('SREM', KEYS[1], id)
    end
  end
  if redis.call('SCARD', KEYS[1]) >= cap then return 0 end
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS[1]: the owner's streams. ARGV: claim id, now, lapse time, most streams, key TTL.
_OPEN_STREAM = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class Quotas:
    """Queued-job and open-stream counts of one owner."""

    def __init__(self, redis: Redis, owner: str) -> None:
        self.redis = redis
        self.owner = owner
        self._reserve = redis.register_script(_RESERVE_QUEUED)
        self._open = redis.register_script(_OPEN_STREAM)

    def reserve_queued(self, job_id: str, cap: int, ttl: int) -> bool:
        """Count ``job_id`` as queued unless the owner already has ``cap`` queued jobs."""
        added = self._reserve(keys=[keys.owner_queued(self.owner)], args=[job_id, cap, keys.job(""), ttl])
        return bool(added)

    def release_queued(self, job_id: str) -> None:
        self.redis.srem(keys.owner_queued(self.owner), job_id)

    def open_stream(self, most: int) -> str | None:
        """Claim one of the owner's ``most`` event streams: a claim id, or None if all are open."""
        claim = uuid.uuid4().hex
        now = time.time()
        opened = self._open(keys=[keys.owner_streams(self.owner)],
                            args=[claim, now, now + STREAM_CLAIM_SECONDS, most, STREAM_CLAIM_SECONDS])
        return claim if opened else None

    def renew_stream(self, claim: str) -> None:
        self.redis.zadd(keys.owner_streams(self.owner), {claim: time.time() + STREAM_CLAIM_SECONDS}, xx=True)

    def close_stream(self, claim: str) -> None:
        self.redis.zrem(keys.owner_streams(self.owner), claim)
