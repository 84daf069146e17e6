"""The webhook outbox: status events written by the guarded scripts, turned into deliveries.

A job's status change and its webhook delivery must exist together: a worker
that dies between storing a job's result and scheduling its ``job.succeeded``
delivery would otherwise leave a job that succeeded and a receiver that is
never told. So the scripts of ``diffq.app.contract.store`` that change a status
(claim, finish, requeue, cancel, deadline) append the event, in the same
script, to one Redis stream, ``diffq:webhooks:outbox``, when the job's webhook
subscribes to it. Each entry holds ``job_id``, ``type``, ``data`` (the event's
JSON, as in the job's own stream) and ``webhook`` (the job's webhook spec). A
``batch.completed`` entry (``diffq.app.contract.batches``) holds the batch id in
``job_id`` and the batch's counts in ``data``.

The deliverer reads the outbox (``relay``, at the start of every pass) and
turns each entry into a delivery (``diffq.app.contract.webhook_queue``), in one script that
deletes the entry and writes the delivery together, so an entry becomes
exactly one delivery however many deliverers relay at once, and a relay that
dies part-way leaves the rest for the next one.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import ValidationError
from redis import Redis

from diffq.app.contract import batches, keys
from diffq.app.contract.events import webhook_data, webhook_id
from diffq.app.contract.records import Webhook
from diffq.app.contract.webhook_queue import DUE, KEEP_FOR, prepare

log = logging.getLogger(__name__)

OUTBOX = f"{keys.PREFIX}:webhooks:outbox"
"""Stream of status events still to be turned into webhook deliveries."""

BATCH = 100
"""Entries relayed per call."""

# KEYS[1]: the outbox; KEYS[2]: the due set. ARGV: triples of entry id, delivery key, delivery JSON,
# then (after them) the delivery TTL and the due time. An entry another relay has already taken
# (XDEL finds nothing) is skipped, so each entry is written as one delivery at most once.
_RELAY = """
local n = (#ARGV - 2) / 3
local ttl, due = ARGV[#ARGV - 1], ARGV[#ARGV]
local written = 0
for i = 0, n - 1 do
  local entry, key, body = ARGV[3 * i + 1], ARGV[3 * i + 2], ARGV[3 * i + 3]
  if redis.call('XDEL', KEYS[1], entry) == 1 then
    local record = cjson.decode(body)
    redis.call('SET', key, body, 'EX', ttl)
    redis.call('ZADD', KEYS[2], due, record['id'])
    written = written + 1
  end
end
return written
"""


def relay(redis: Redis, now: float, batch: int = BATCH) -> int:
    """Turn up to ``batch`` outbox entries into due deliveries; returns how many were written."""
    entries = redis.xrange(OUTBOX, count=batch)
    if not entries:
        return 0
    args: list[Any] = []
    for entry_id, fields in entries:
        decoded = {_text(k): _text(v) for k, v in fields.items()}
        try:
            job_id, kind, data = decoded["job_id"], decoded["type"], json.loads(decoded["data"])
            webhook = Webhook.model_validate_json(decoded["webhook"])
        except (KeyError, ValueError, ValidationError) as error:  # never block the entries behind it
            log.error("outbox entry %s is malformed (%s); dropped: %s", _text(entry_id), error, decoded)
            redis.xdel(OUTBOX, entry_id)
            continue
        if kind.startswith("batch."):  # written by a batch's last item (diffq.app.contract.batches); job_id: the batch
            delivery = prepare(
                job_id, webhook.url, kind, batches.webhook_data(job_id, data), batches.webhook_id(job_id, kind), now=now
            )
        else:
            delivery = prepare(
                job_id,
                webhook.url,
                f"job.{kind}",
                webhook_data(job_id, kind, data),
                webhook_id(job_id, kind, data),
                now=now,
            )
        args += [_text(entry_id), delivery.key, delivery.body]
    if not args:
        return 0
    return int(redis.register_script(_RELAY)(keys=[OUTBOX, DUE], args=[*args, KEEP_FOR, now]))


def pending(redis: Redis) -> int:
    """Entries not yet relayed."""
    return int(redis.xlen(OUTBOX))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
