"""The Idempotency-Key store: a retried ``POST`` gets the job the first one created.

A client that lost the response to ``POST /v1/jobs`` (timeout, dropped
connection) cannot know whether its job exists. With an ``Idempotency-Key``
header it can simply send the request again: the first request with a key
reserves it for the job id it is about to create, and every later request
with that key and the same body gets that job id back instead of a second
job. The same key with a different body is a client bug, refused with
``IdempotencyConflictError`` (409) rather than silently answered with the
wrong job.

Reserving the key and creating the job are one atomic step: the reservation
is written in the same ``MULTI`` as the job (``JobService.submit``), under a
``WATCH`` of the key, so a key never stands for a job that was not created
(an API killed, or Redis dying, between the two would otherwise leave a key
that answers ``409`` and then ``404`` for a day). Interface::

    store = IdempotencyStore(redis, settings.idempotency_ttl)
    key = validate_key(request.headers.get("Idempotency-Key"))  # None: no header
    body = fingerprint(json_body)              # or fingerprint_multipart(fields, files)
    existing = store.lookup(key, body)         # may raise 409 (another body)
    if existing is not None:
        answer with job existing.job_id (404 if it was deleted or has expired)
    else:
        entry = store.entry(key, body, new_job_id())
        with redis.pipeline() as pipe:
            entry.write(pipe)                  # WATCH, check, MULTI, SET
            ... create the job in pipe ...
            pipe.execute()                     # WatchError / KeyTakenError: look up again

Redis: ``diffq:idempotency:<sha256 hex of scope and key>`` is a string holding
JSON ``{"body_sha256", "job_id", "created_at"}`` with a TTL of
``idempotency_ttl`` from the first use. The key is hashed so that client-chosen
text never becomes part of a Redis key, and ``scope`` (a tenant or API-key id,
once there are tenants) keeps two clients' keys apart.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis import Redis
from redis.client import Pipeline

from diffq.app.contract import keys
from diffq.app.contract.records import utcnow
from diffq.app.contract.scripts import script
from diffq.app.core.errors import FieldProblem, IdempotencyConflictError, InvalidRequestError

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255

# KEYS[1]: the idempotency key. ARGV[1]: JSON to store if absent; ARGV[2]: TTL in seconds.
# Returns the JSON already stored, or false after storing ARGV[1]: one step, so of any
# number of concurrent reservations exactly one stores its job id.
_RESERVE = """
local existing = redis.call('GET', KEYS[1])
if existing then return existing end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""

# KEYS[1]: the idempotency key. ARGV[1]: job id the reservation must hold (compare and delete,
# so a late release never drops a reservation that another request made after this one expired).
_RELEASE = """
local existing = redis.call('GET', KEYS[1])
if not existing then return 0 end
if cjson.decode(existing)['job_id'] ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


@dataclass(frozen=True)
class Reservation:
    """The job an Idempotency-Key stands for.

    ``created`` is true for exactly one request per key: the one that must now
    create job ``job_id``. Other requests get ``created=False`` and the same
    ``job_id``, possibly while the first is still creating it, so the job record
    can be missing for a moment (or for good, if that request fails and releases
    the key): the caller should look it up briefly before answering.
    """

    job_id: str
    created: bool
    created_at: datetime


def validate_key(key: str | None) -> str | None:
    """The header's value if it is a usable key (1..255 printable ASCII characters), ``None``
    if there was no header; raises ``InvalidRequestError`` naming the header otherwise."""
    if key is None:
        return None
    problem = key_problem(key)
    if problem is not None:
        raise InvalidRequestError([FieldProblem(HEADER, problem)])
    return key


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid Idempotency-Key, or ``None`` if it is."""
    if not key.strip():
        return "must not be empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"is {len(key)} characters long; at most {MAX_KEY_LENGTH} accepted"
    if not all(" " <= char <= "~" for char in key):
        return "must be printable ASCII characters only (for example a UUID)"
    return None


def canonical_json(value: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def fingerprint(body: dict[str, Any] | bytes) -> str:
    """sha256 hex of a request body, the same whatever its key order and whitespace.

    ``bytes`` are a raw JSON body; bytes that are not JSON are hashed as they are
    (such a request fails validation anyway, and its retry is the same bytes).
    """
    if isinstance(body, bytes):
        try:
            return hashlib.sha256(canonical_json(json.loads(body))).hexdigest()
        except (UnicodeDecodeError, ValueError):
            return hashlib.sha256(body).hexdigest()
    return hashlib.sha256(canonical_json(body)).hexdigest()


def fingerprint_multipart(fields: dict[str, Any], files: dict[str, bytes]) -> str:
    """The fingerprint of a multipart request: its form fields plus the sha256 of each file,
    so the same upload sent again matches without keeping the file itself."""
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return fingerprint({"fields": fields, "files": digests})


def redis_key(key: str, scope: str = "") -> str:
    """Where a key's reservation lives: a hash of scope and key (length-prefixed, so no
    scope/key pair can be spelled as another)."""
    digest = hashlib.sha256(f"{len(scope)}:{scope}:{key}".encode()).hexdigest()
    return f"{keys.PREFIX}:idempotency:{digest}"


class KeyTakenError(Exception):
    """Another request wrote the key first (``Entry.write`` found it, or ``WATCH`` saw it change)."""


@dataclass(frozen=True)
class Entry:
    """A reservation to write in the same transaction as its job."""

    redis_key: str
    value: str
    ttl: int
    job_id: str

    def write(self, pipe: Pipeline) -> None:
        """``WATCH`` the key, refuse if it is taken, then open the ``MULTI`` with its ``SET``: the
        caller queues the job's writes after it and executes. ``KeyTakenError`` (here), or
        ``WatchError`` (at execute), means another request got there first."""
        pipe.watch(self.redis_key)
        if pipe.get(self.redis_key) is not None:
            pipe.reset()
            raise KeyTakenError(self.redis_key)
        pipe.multi()
        pipe.set(self.redis_key, self.value, ex=self.ttl)


class IdempotencyStore:
    """Reservations of Idempotency-Keys in Redis, each kept ``ttl_seconds`` from first use."""

    def __init__(self, redis: Redis, ttl_seconds: int) -> None:
        self.redis = redis
        self.ttl_seconds = ttl_seconds
        self._reserve = script(redis, _RESERVE)
        self._release = script(redis, _RELEASE)

    def reserve(self, key: str, body_fingerprint: str, new_job_id: str, scope: str = "") -> Reservation:
        """Reserve ``key`` for ``new_job_id``, or return the job it already stands for.

        Raises ``InvalidRequestError`` for an invalid key and ``IdempotencyConflictError``
        when the key was used with a different body fingerprint.
        """
        validate_key(key)
        now = utcnow()
        entry = {"body_sha256": body_fingerprint, "job_id": new_job_id, "created_at": now.isoformat()}
        stored = self._reserve(keys=[redis_key(key, scope)], args=[json.dumps(entry), self.ttl_seconds])
        if stored is None:
            return Reservation(job_id=new_job_id, created=True, created_at=now)
        existing = json.loads(stored)
        if existing["body_sha256"] != body_fingerprint:
            raise IdempotencyConflictError(key, existing["created_at"])
        return Reservation(
            job_id=existing["job_id"], created=False, created_at=datetime.fromisoformat(existing["created_at"])
        )

    def lookup(self, key: str, body_fingerprint: str, scope: str = "") -> Reservation | None:
        """The job ``key`` stands for, or ``None`` if it is free. Raises
        ``IdempotencyConflictError`` when the key was used with another body."""
        validate_key(key)
        stored = self.redis.get(redis_key(key, scope))
        if stored is None:
            return None
        existing = json.loads(stored)
        if existing["body_sha256"] != body_fingerprint:
            raise IdempotencyConflictError(key, existing["created_at"])
        return Reservation(
            job_id=existing["job_id"], created=False, created_at=datetime.fromisoformat(existing["created_at"])
        )

    def entry(self, key: str, body_fingerprint: str, job_id: str, scope: str = "") -> Entry:
        """The reservation of ``key`` for ``job_id``, to write with the job (``Entry.write``)."""
        validate_key(key)
        value = {"body_sha256": body_fingerprint, "job_id": job_id, "created_at": utcnow().isoformat()}
        return Entry(redis_key(key, scope), json.dumps(value), self.ttl_seconds, job_id)

    def release(self, key: str, job_id: str | None = None, scope: str = "") -> bool:
        """Forget a reservation whose job could not be created, so a retry can create it.

        With ``job_id``, only a reservation for that job is dropped (the safe form:
        the key may have expired and been reserved again by another request).
        Returns whether a reservation was dropped.
        """
        if job_id is None:
            return bool(self.redis.delete(redis_key(key, scope)))
        return bool(self._release(keys=[redis_key(key, scope)], args=[job_id]))

    def get(self, key: str, scope: str = "") -> dict[str, str] | None:
        """The stored reservation (``body_sha256``, ``job_id``, ``created_at``), or ``None``."""
        stored = self.redis.get(redis_key(key, scope))
        return json.loads(stored) if stored is not None else None
