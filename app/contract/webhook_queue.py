"""Scheduling webhook deliveries: the write that must happen with the job's status change.

A webhook is lost if a job changes status but its delivery is never
recorded (a crash between the two writes). So ``schedule`` only queues Redis
commands on what it is given: pass the pipeline (``MULTI``) that writes the
status change, and the delivery exists exactly when the change does. The
deliverer (``diffq.app.webhooks.deliver``, its own process) sends it later, retrying until
it is accepted or ``webhook_max_age`` has passed.

Note that a guarded write done by a Lua script inside the same ``MULTI`` (for
example ``JobStore.finish`` refusing a stale attempt) does not stop the other
commands of the transaction. Where a delivery must depend on such a check,
use ``prepare`` and write ``Delivery.key``/``Delivery.body`` and
``DUE``/``Delivery.due_at`` from within that script instead.

Interface::

    with redis.pipeline() as pipe:
        ... the job's status change ...
        schedule(pipe, job_id, url, "job.succeeded", {"id": job_id, "status": "succeeded"}, event_id)
        pipe.execute()

Redis:

- ``diffq:webhooks:due``: sorted set of delivery ids, scored by the unix time
  each is next due;
- ``diffq:webhook:delivery:<delivery id>``: JSON of one delivery (``Delivery``
  fields below), kept ``keep_for`` seconds (the deliverer extends it while
  it retries and deletes it when done).

The body sent is the Standard Webhooks payload
``{"type": "job.succeeded", "timestamp": "<ISO 8601>", "data": {...}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline

from diffq.app.contract import keys
from diffq.app.contract.records import utcnow

DUE = f"{keys.PREFIX}:webhooks:due"
"""Sorted set: delivery id -> unix time it is next due."""

DELIVERY_PREFIX = f"{keys.PREFIX}:webhook:delivery:"

KEEP_FOR = 7 * 86400
"""Default lifetime of an unsent delivery: long enough to outlive a deliverer outage."""


def delivery_key(delivery_id: str) -> str:
    """JSON of one pending delivery."""
    return DELIVERY_PREFIX + delivery_id


@dataclass(frozen=True)
class Delivery:
    """A delivery ready to be written: ``body`` goes to ``key``, ``id`` into ``DUE`` at ``due_at``."""

    id: str
    key: str
    body: str
    due_at: float


def payload(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    """The Standard Webhooks body of one event."""
    return {"type": event_type, "timestamp": utcnow().isoformat().replace("+00:00", "Z"), "data": data}


def prepare(
    job_id: str, url: str, event_type: str, data: dict[str, Any], event_id: str, *, now: float | None = None
) -> Delivery:
    """Build a delivery of one event to one URL, due ``now`` (default: at once)."""
    due_at = time.time() if now is None else now
    delivery_id = uuid.uuid4().hex
    record = {
        "id": delivery_id,
        "event_id": event_id,  # the webhook-id header: the same on every retry
        "job_id": job_id,
        "url": url,
        "type": event_type,
        "payload": payload(event_type, data),
        "attempts": 0,
        "created_at": due_at,
        "first_attempt_at": None,
    }
    return Delivery(id=delivery_id, key=delivery_key(delivery_id), body=json.dumps(record), due_at=due_at)


def schedule(
    target: Redis | Pipeline,
    job_id: str,
    url: str,
    event_type: str,
    data: dict[str, Any],
    event_id: str,
    *,
    now: float | None = None,
    keep_for: int = KEEP_FOR,
) -> str:
    """Queue the delivery of one event on ``target``; returns the delivery id.

    With a pipeline, the commands run when the caller executes it (inside its
    ``MULTI``); with a plain client they run now, in a ``MULTI`` of their own.
    """
    delivery = prepare(job_id, url, event_type, data, event_id, now=now)
    if isinstance(target, Pipeline):
        _write(target, delivery, keep_for)
    else:
        with target.pipeline() as pipe:
            _write(pipe, delivery, keep_for)
            pipe.execute()
    return delivery.id


def _write(pipe: Pipeline, delivery: Delivery, keep_for: int) -> None:
    pipe.set(delivery.key, delivery.body, ex=keep_for)
    pipe.zadd(DUE, {delivery.id: delivery.due_at})
