"""Batch records: many jobs submitted as one, counted as they end, announced once when all have.

A batch (``POST /v1/batches``) is a hash, ``diffq:batch:<id>`` (``BatchRecord``), and the
list of its items' job ids in item order, ``diffq:batch:<id>:items``. Each item is an
ordinary job whose record names its batch (``JobRecord.batch``): workers run it like any
other job and know nothing of batches.

Counting happens where the item ends: every guarded script of ``diffq.app.contract.store`` that
gives a job its terminal status runs ``TALLY`` in the same script, which raises the batch's
``ended`` counter and the counter of that status. The script whose item makes ``ended``
reach ``total`` marks the batch completed, sets its keys to expire after the batch's
retention, and (when the batch has a webhook) appends one ``batch.completed`` entry to the
webhook outbox. Guards make a job end at most once, so each item is counted once and the
batch completes once, whatever workers die or retry in between.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from diffq.app.contract import keys
from diffq.app.contract.records import Webhook

#: Statuses an item can end in; each is a counter of the batch hash.
ENDED_STATUSES = ("succeeded", "failed", "canceled")

# tally(job key, outbox key, terminal event type): count an ended batch item (see the module
# docstring). The batch's keys are named from the job record's ``batch`` field; tally_batch(that
# field's value, outbox key, type): the same, for a script that has read the field already.
TALLY = f"""
local function tally_batch(raw, outbox, kind)
  if not raw or raw == 'null' then return end
  local ok, ref = pcall(cjson.decode, raw)
  if not ok or type(ref) ~= 'table' or type(ref['id']) ~= 'string' then return end
  local bkey = '{keys.BATCH_PREFIX}' .. ref['id']
  if redis.call('EXISTS', bkey) == 0 then return end
  redis.call('HINCRBY', bkey, kind, 1)
  local ended = redis.call('HINCRBY', bkey, 'ended', 1)
  if ended ~= tonumber(redis.call('HGET', bkey, 'total')) then return end
  local now = redis.call('TIME')
  redis.call('HSET', bkey, 'completed_at', tostring(tonumber(now[1]) + tonumber(now[2]) / 1000000))
  local keep = tonumber(redis.call('HGET', bkey, 'retention') or '0')
  if keep and keep > 0 then
    redis.call('EXPIRE', bkey, keep)
    redis.call('EXPIRE', bkey .. ':items', keep)
  end
  local hook = redis.call('HGET', bkey, 'webhook')
  if not hook or hook == 'null' then return end
  local counts = {{total = ended}}
  for _, name in ipairs({{'succeeded', 'failed', 'canceled'}}) do
    counts[name] = tonumber(redis.call('HGET', bkey, name) or '0')
  end
  redis.call('XADD', outbox, '*', 'job_id', ref['id'], 'type', 'batch.completed', 'data', cjson.encode(counts),
             'webhook', hook)
end
local function tally(job_key, outbox, kind)
  tally_batch(redis.call('HGET', job_key, 'batch'), outbox, kind)
end
"""


class BatchRecord(BaseModel):
    """A batch as stored: who made it, how many items, and the counters of the ended ones."""

    id: str
    owner: str | None = None  # API key id; None: made while auth was off
    model: str
    total: int
    created_at: float  # unix seconds
    completed_at: float | None = None  # when its last item ended
    canceled_at: float | None = None  # when a client canceled it
    priority: str = "low"
    retention: int  # seconds the batch is kept after its last item ends (its items' retention)
    webhook: Webhook | None = None  # where batch.completed goes
    metadata: dict[str, str] = Field(default_factory=dict)
    ended: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0

    def to_hash(self) -> dict[str, str]:
        """Redis hash fields, each JSON-encoded (integers stay plain digits, so HINCRBY works)."""
        return {name: json.dumps(value, separators=(",", ":")) for name, value in self.model_dump(mode="json").items()}

    @classmethod
    def from_hash(cls, fields: dict[bytes, bytes]) -> BatchRecord:
        return cls.model_validate({k.decode(): json.loads(v) for k, v in fields.items()})


def webhook_data(batch_id: str, data: dict[str, Any]) -> dict[str, Any]:
    """The ``data`` of a ``batch.completed`` payload: the counts, and the batch's and results' paths."""
    path = f"/v1/batches/{batch_id}"
    return {"id": batch_id, "url": path, "results_url": f"{path}/results.jsonl", "status": "completed", **data}


def webhook_id(batch_id: str, kind: str) -> str:
    """The ``webhook-id`` of a batch event: one per batch and type, so a repeat can be dropped."""
    return f"msg_{batch_id}_{kind.replace('.', '_')}"
