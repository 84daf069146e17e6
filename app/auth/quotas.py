"""Per-key quotas kept in Redis, so every API process enforces the same ones.

- Request rate: a sliding-window counter (two counters in the key's record, the ``limits``
  package's algorithm in one script, with the key's revocation read in the same command), answered
  with ``RateLimit-*`` headers on every response and ``429`` + ``Retry-After`` past it.
- Queued jobs: a set of the key's queued job ids, checked and added to in one script.
- Open waits: claims that lapse unless renewed, so a crashed API process cannot hold a key's
  waits for ever. A claim is counted in one or more sorted sets at once, each with its cap, and
  taken only if every one has room: every wait (long poll, event stream, OpenAI-endpoint
  request) counts in the key's waits, and an event stream in its streams as well.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from limits import RateLimitItem, parse
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from diffq.app.contract import keys
from diffq.app.contract.rate import HIT_FN
from diffq.app.contract.scripts import script

#: Seconds a wait's claim lasts unless its wait renews it.
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


# One request against a key's rate, in one round trip (``diffq.app.contract.rate.HIT_FN``); the submit
# script of ``POST /v1/jobs`` runs the same function before its own checks.
_HIT = HIT_FN + "return rate_hit(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4])\n"


class RateLimiter:
    """Counts requests per key id in Redis (``_HIT``); ``quick``: an asyncio client for ``hit_async``."""

    def __init__(self, redis: Redis, quick: AsyncRedis | None = None) -> None:
        self.redis = redis
        self._hit = script(redis, _HIT)
        self._hit_async = script(quick, _HIT) if quick is not None else None
        self._items: dict[str, RateLimitItem] = {}

    def hit(self, key_id: str, rate: str) -> RateDecision | None:
        """Count one request of key ``key_id``; ``None`` if the key is revoked or gone (uncounted)."""
        item, arguments = self._arguments(key_id, rate)
        return _decision(item, self._hit(keys=[keys.api_key(key_id)], args=arguments))

    async def hit_async(self, key_id: str, rate: str) -> RateDecision | None:
        """``hit`` from the event loop, through the asyncio client."""
        if self._hit_async is None:
            raise RuntimeError("this RateLimiter has no asyncio client")
        item, arguments = self._arguments(key_id, rate)
        return _decision(item, await self._hit_async(keys=[keys.api_key(key_id)], args=arguments))

    def arguments(self, key_id: str, rate: str) -> tuple[RateLimitItem, list[object]]:
        """The rate's item and ``rate_hit``'s ARGV for one request of ``key_id`` (its KEYS[1]: the key's record)."""
        return self._arguments(key_id, rate)

    def _arguments(self, key_id: str, rate: str) -> tuple[RateLimitItem, list[object]]:
        item = self._items.get(rate)
        if item is None:
            item = self._items[rate] = parse_rate(rate)
        window = item.get_expiry()
        # The API process's clock, not Redis's TIME: one command fewer per request; API processes' clocks
        # a few milliseconds apart move a window's edge by as much.
        return item, [f"{keys.RATE_FIELD_PREFIX}{item.amount}/{window}:", item.amount, window, time.time()]


def decision(item: RateLimitItem, reply: list[int]) -> RateDecision | None:
    """``rate_hit``'s reply as a decision; ``None``: the key is revoked or gone."""
    return _decision(item, reply)


def _decision(item: RateLimitItem, reply: list[int]) -> RateDecision | None:
    if int(reply[0]) < 0:
        return None
    allowed, remaining, reset_ms, retry_ms = (int(value) for value in reply)
    reset = math.ceil((retry_ms if not allowed else reset_ms) / 1000)
    return RateDecision(bool(allowed), item.amount, max(0, remaining), reset, item.get_expiry())


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

# KEYS: the owner's claim sets. ARGV: claim id, now, lapse time, key TTL, then each set's cap.
# Returns 0 once the claim is in every set, else the (1-based) index of the first full set.
# Lapsed claims (a crashed API process's) are dropped only from a set that looks full: below its
# cap they cannot refuse anyone, and the set's TTL ends them with it.
_OPEN_CLAIM = """
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[4 + i])
  if redis.call('ZCARD', key) >= cap then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[2])
    if redis.call('ZCARD', key) >= cap then return i end
  end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[3], ARGV[1])
  redis.call('EXPIRE', key, ARGV[4])
end
return 0
"""


@dataclass(frozen=True)
class Claim:
    """A claim on one of several capped sets (e.g. the key's waits and its streams)."""

    id: str
    sets: tuple[str, ...]


class Quotas:
    """Queued-job and open-wait counts of one owner."""

    def __init__(self, redis: Redis, owner: str) -> None:
        self.redis = redis
        self.owner = owner
        self._reserve = script(redis, _RESERVE_QUEUED)
        self._open = script(redis, _OPEN_CLAIM)

    def reserve_queued(self, job_id: str, cap: int, ttl: int) -> bool:
        """Count ``job_id`` as queued unless the owner already has ``cap`` queued jobs."""
        added = self._reserve(keys=[keys.owner_queued(self.owner)], args=[job_id, cap, keys.job(""), ttl])
        return bool(added)

    def release_queued(self, job_id: str) -> None:
        self.redis.srem(keys.owner_queued(self.owner), job_id)

    def open_claim(self, caps: dict[str, int]) -> Claim | str:
        """Claim a place in each of ``caps``' sets (Redis key -> most members): the claim, or the
        key of the first set that is full (nothing is claimed then)."""
        claim = uuid.uuid4().hex
        now = time.time()
        sets = list(caps)
        full = self._open(
            keys=sets, args=[claim, now, now + STREAM_CLAIM_SECONDS, STREAM_CLAIM_SECONDS, *caps.values()]
        )
        return Claim(claim, tuple(sets)) if not full else sets[int(full) - 1]

    def renew_claim(self, claim: Claim) -> None:
        lapse = time.time() + STREAM_CLAIM_SECONDS
        with self.redis.pipeline(transaction=False) as pipe:
            for key in claim.sets:
                pipe.zadd(key, {claim.id: lapse}, xx=True)
            pipe.execute()

    def close_claim(self, claim: Claim) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for key in claim.sets:
                pipe.zrem(key, claim.id)
            pipe.execute()
