"""API keys: created and revoked with ``diffq keys``, stored hashed, checked in constant time.

A key looks like ``dq_<id>_<secret>``: ``id`` (12 hex characters) names the key in listings,
logs and Redis and is not secret; ``secret`` is 32 random bytes (URL-safe base64). Redis keeps
only the SHA-256 of the secret: a secret with 256 bits of entropy needs no slow password hash,
and nobody who reads Redis (or a backup of it) can use what they read.

Checking a key costs the same whatever is wrong with it: a missing header, a malformed key, an
unknown id, a wrong secret and a revoked key all make one Redis read and one SHA-256, compare
with ``hmac.compare_digest`` (against a dummy digest when there is nothing to compare with) and
give the same answer, so neither the body nor the timing tells a caller which part was wrong.

Redis (``diffq.app.contract.keys`` lists these too):

- ``diffq:apikey:<id>``: hash, no TTL. The ``ApiKey`` fields, JSON-encoded.
- ``diffq:apikeys``: set of every key id (revoked ones too), for ``diffq keys list``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from diffq.app.contract import keys
from diffq.app.contract.records import encode_fields, utcnow

PREFIX = "dq"
_TOKEN = re.compile(r"dq_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
#: Compared against when a key has no stored digest, so every check does the same work.
_DUMMY_DIGEST = json.dumps(hashlib.sha256(b"diffq: no such key").hexdigest()).encode()  # as stored: JSON

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")
"""Priority classes, first served first: a worker takes a queued ``high`` job before any ``normal`` one."""


class KeyLimits(BaseModel):
    """What a key may do; ``None`` means the deployment's default (``DIFFQ_*`` settings)."""

    rate_limit: str | None = Field(None, description='Requests per period, e.g. "20/second", "600/minute".')
    max_queued_jobs: int | None = Field(None, ge=1, description="Jobs it may have queued at once.")
    max_job_cost: int | None = Field(None, ge=1, description="Most width × height × steps × images per job.")
    max_event_streams: int | None = Field(None, ge=1, description="Event streams it may hold open at once.")
    priority: Priority = "normal"
    strip_metadata: bool = Field(False, description="Never write generation parameters into its PNGs.")
    content_credentials: Literal["required", "optional", "off"] | None = Field(
        None,
        description="C2PA signing of its images: required, optional (when the deployment signs), off; "
        "None: the deployment's DIFFQ_CONTENT_CREDENTIALS.",
    )

    @field_validator("rate_limit")
    @classmethod
    def _a_rate(cls, value: str | None) -> str | None:
        from diffq.app.auth.quotas import parse_rate

        if value is not None:
            parse_rate(value)
        return value


class ApiKey(KeyLimits):
    """A stored key: its public id and name, the digest of its secret, and its limits."""

    id: str
    name: str
    digest: str  # sha256 hex of the secret
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed key, else None."""
    match = _TOKEN.fullmatch(token)
    return (match.group(1), match.group(2)) if match else None


class KeyStore:
    """API keys in Redis."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def create(self, name: str, limits: KeyLimits | None = None) -> tuple[ApiKey, str]:
        """A new key and its token; the token is shown once and never stored."""
        if not name.strip():
            raise ValueError("a key needs a name, e.g. --name shop-a")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        key = ApiKey(id=key_id, name=name, digest=digest(secret), **(limits or KeyLimits()).model_dump())
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.api_key(key_id), mapping=encode_fields(key.model_dump(mode="json")))
            pipe.sadd(keys.API_KEYS, key_id)
            pipe.execute()
        return key, f"{PREFIX}_{key_id}_{secret}"

    def get(self, key_id: str) -> ApiKey | None:
        return _from_hash(self.redis.hgetall(keys.api_key(key_id)))

    def all(self) -> list[ApiKey]:
        ids = sorted(i.decode() for i in self.redis.smembers(keys.API_KEYS))
        with self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(keys.api_key(key_id))
            found = [_from_hash(fields) for fields in pipe.execute()]
        return sorted((key for key in found if key is not None), key=lambda key: key.created_at)

    def find(self, id_or_name: str) -> list[ApiKey]:
        """Keys whose id or name is ``id_or_name``."""
        return [key for key in self.all() if id_or_name in (key.id, key.name)]

    def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke a key: from now on it is refused like an unknown one. Its jobs stay until they expire."""
        key = self.get(key_id)
        if key is None:
            return None
        if key.active:
            key = key.model_copy(update={"revoked_at": utcnow()})
            revoked = key.model_dump(mode="json", include={"revoked_at"})
            self.redis.hset(keys.api_key(key_id), mapping=encode_fields(revoked))
        return key

    def verify(self, token: str | None) -> ApiKey | None:
        """The active key ``token`` is, else None; the same work whatever is wrong (see the module):
        the stored record is parsed only once the key has matched and is not revoked."""
        key_id, secret, parsed = _split(token)
        return _checked(self.redis.hgetall(keys.api_key(key_id)), secret, parsed)


async def verify_async(quick: AsyncRedis, token: str | None) -> ApiKey | None:
    """``KeyStore.verify`` through an asyncio client, from the event loop."""
    key_id, secret, parsed = _split(token)
    return _checked(await quick.hgetall(keys.api_key(key_id)), secret, parsed)


def _split(token: str | None) -> tuple[str, str, bool]:
    """The key id to read (``-`` for a malformed token: read all the same), the secret, and whether it parsed."""
    parsed = parse_token(token or "")
    key_id, secret = parsed if parsed is not None else ("-", token or "")
    return key_id, secret, parsed is not None


def _checked(fields: dict[bytes, bytes], secret: str, parsed: bool) -> ApiKey | None:
    expected = json.loads(fields.get(b"digest", _DUMMY_DIGEST))
    revoked = json.loads(fields.get(b"revoked_at", b"null")) is not None
    matches = hmac.compare_digest(digest(secret), expected)
    if not matches or not parsed or revoked or not fields:
        return None
    return _from_hash(fields)


_RATE_FIELD = keys.RATE_FIELD_PREFIX.encode()


def _from_hash(fields: dict[bytes, bytes]) -> ApiKey | None:
    if not fields:
        return None
    # The rate's counters live in the same hash (diffq.app.contract.rate); they are not the key's.
    return ApiKey.model_validate(
        {k.decode(): json.loads(v) for k, v in fields.items() if not k.startswith(_RATE_FIELD)}
    )


class VerifiedKeys:
    """Keys this process has checked lately, by the SHA-256 of the token, for ``seconds``: a
    request with a key it has just seen skips the Redis read and the parse. Revocation is not
    cached: the rate check reads the key's ``revoked_at`` in its own round trip
    (``diffq.app.auth.quotas.RateLimiter``), and a revoked key is dropped from here. Only a token that
    verified is kept, so a miss costs what it always did (``KeyStore.verify``)."""

    def __init__(self, seconds: float, most: int = 10_000) -> None:
        self.seconds = seconds
        self.most = most
        self._keys: dict[str, tuple[float, ApiKey]] = {}

    def get(self, token: str) -> ApiKey | None:
        if self.seconds <= 0:
            return None
        found = self._keys.get(_token_digest(token))
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]

    def put(self, token: str, key: ApiKey) -> None:
        if self.seconds <= 0:
            return
        if len(self._keys) >= self.most:
            self._keys.clear()  # a flood of distinct keys: start again rather than grow
        self._keys[_token_digest(token)] = (time.monotonic() + self.seconds, key)

    def drop(self, token: str) -> None:
        self._keys.pop(_token_digest(token), None)


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
