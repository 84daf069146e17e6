"""Job events: one Redis stream per job, so polling, SSE and webhooks tell the same story.

Event types, in the order a job emits them:

- ``queued`` (by the API, in the same MULTI that creates the job),
- ``running`` (a worker claimed it; again on a retry, with its attempt),
- ``progress`` (step, total, eta_seconds; throttled like the record's progress),
- ``preview`` (a new preview PNG is stored; step, total),
- one terminal event: ``succeeded``, ``failed`` or ``canceled``.

An event's id is its stream entry id (``<ms>-<n>``): increasing, and what an
SSE client sends back as ``Last-Event-ID`` to resume after it. The stream
lives as long as the job record and is trimmed to its latest entries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline

from app.contract import keys

TERMINAL_EVENTS = frozenset({"succeeded", "failed", "canceled"})
#: Entries kept per job: progress is throttled, so this covers many minutes of a run.
MAX_EVENTS = 1000


@dataclass(frozen=True)
class Event:
    """One event of a job as read back from its stream."""

    id: str
    type: str
    data: dict[str, Any]

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


def publish(redis: Redis | Pipeline, job_id: str, type: str, data: dict[str, Any], ttl: int) -> None:
    """Append an event (inside the caller's pipeline when one is given) and renew the stream's TTL."""
    stream = keys.events(job_id)
    redis.xadd(stream, {"type": type, "data": json.dumps(data, separators=(",", ":"))},
               maxlen=MAX_EVENTS, approximate=True)
    redis.expire(stream, ttl)


def parse(entries: list) -> list[Event]:
    """Events from XRANGE/XREAD entries: ``[(id, {b"type": ..., b"data": ...}), ...]``."""
    events = []
    for entry_id, fields in entries:
        decoded = {_text(k): _text(v) for k, v in fields.items()}
        events.append(Event(id=_text(entry_id), type=decoded["type"], data=json.loads(decoded["data"])))
    return events


def read(redis: Redis, job_id: str, after: str = "0", count: int = 100) -> list[Event]:
    """Events after id ``after`` (exclusive), without blocking."""
    return parse(redis.xrange(keys.events(job_id), min=f"({after}" if after != "0" else "-", count=count))


def last_id(redis: Redis, job_id: str) -> str:
    """Id of the job's newest event, or "0" when there is none."""
    return last_id_text(redis.xrevrange(keys.events(job_id), count=1))


def last_id_text(newest: list) -> str:
    """The id in an ``XREVRANGE ... COUNT 1`` reply, or "0" for an empty stream."""
    return _text(newest[0][0]) if newest else "0"


def is_event_id(text: str) -> bool:
    """Whether ``text`` is a stream id (``<ms>-<seq>``), as SSE clients send back in Last-Event-ID."""
    ms, _, seq = text.partition("-")
    return ms.isdigit() and seq.isdigit()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
