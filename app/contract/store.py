"""Atomic operations on job records, shared by the API and the workers.

Each write that a worker makes is a Lua script that first checks the record
still exists, still belongs to the caller's attempt, and has not ended. So:

- a job deleted by a client is never brought back by a worker still running it;
- a stale run (an older attempt) can never overwrite the run that replaced it;
- a job that ended (for example canceled) never changes status again.

A script that changes a job's status also appends the event that reports it, to the job's
event stream and (when the job's webhook asks for it) to the webhook outbox
(``diffq.app.contract.webhook_outbox``), inside the same script: the change and its event exist together or
not at all, whatever dies in between. A job that is a batch item also counts its terminal event
in its batch there, and the item that ends the batch writes ``batch.completed`` to the outbox
(``diffq.app.contract.batches``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.client import Pipeline
from redis.exceptions import NoScriptError

from diffq.app.contract import batches, events, keys, rate, rq_adapter, tasks, webhook_queue
from diffq.app.contract.records import ErrorCode, JobRecord, encode_fields, utcnow
from diffq.app.contract.scripts import script
from diffq.app.contract.status import TERMINAL, JobStatus
from diffq.app.contract.webhook_outbox import OUTBOX

_TERMINAL_EVENTS_LUA = "{" + ", ".join(f"{k} = true" for k in sorted(events.TERMINAL_EVENTS)) + "}"
_RUNNING_JSON = json.dumps(JobStatus.RUNNING.value).encode()
_TERMINAL_JSON = ", ".join(f"['{json.dumps(s.value)}'] = true" for s in sorted(TERMINAL))

# emit(job key, stream key, outbox key, job id, event type, data JSON): append a status event to
# the job's stream (which lives as long as the record) and, if the job's webhook subscribes to
# it, to the webhook outbox (``diffq.app.contract.webhook_outbox``), which the deliverer turns into deliveries.
_EMIT = (
    batches.TALLY
    + f"""
local function hook_out(outbox, job_id, kind, data, raw)
  if not raw then return end
  local ok, request = pcall(cjson.decode, raw)
  if not ok or type(request) ~= 'table' or type(request['webhook']) ~= 'table' then return end
  local hook = request['webhook']
  for _, wanted in ipairs(hook['events'] or {{}}) do
    if wanted == kind then
      redis.call('XADD', outbox, '*', 'job_id', job_id, 'type', kind, 'data', data,
                 'webhook', cjson.encode(hook))
      return
    end
  end
end
local function emit(job_key, stream, outbox, job_id, kind, data)
  redis.call('XADD', stream, 'MAXLEN', '~', '{events.MAX_EVENTS}', '*', 'type', kind, 'data', data)
  local ttl = redis.call('TTL', job_key)
  if ttl > 0 then redis.call('EXPIRE', stream, ttl) end
  if ({_TERMINAL_EVENTS_LUA})[kind] then tally(job_key, outbox, kind) end
  hook_out(outbox, job_id, kind, data, redis.call('HGET', job_key, 'request'))
end
-- emit_made(..., ttl, request): ``emit`` of a job's first event by the script that has just written
-- its record with TTL ``ttl`` and request field ``request``: no TTL/HGET to read them back.
local function emit_made(stream, outbox, job_id, kind, data, ttl, request)
  redis.call('XADD', stream, 'MAXLEN', '~', '{events.MAX_EVENTS}', '*', 'type', kind, 'data', data)
  redis.call('EXPIRE', stream, ttl)
  hook_out(outbox, job_id, kind, data, request)
end
-- emit_known(..., request, batch): ``emit`` for a script that has read the record's ``request``
-- and ``batch`` fields already (with its guard), into a stream that exists (made by the job's
-- ``queued`` event with the record's TTL, which XADD keeps): one XADD, no TTL/EXPIRE/HGET. A
-- record without its stream gets one as ``emit`` makes it.
local function emit_known(job_key, stream, outbox, job_id, kind, data, request, batch)
  if not redis.call('XADD', stream, 'NOMKSTREAM', 'MAXLEN', '~', '{events.MAX_EVENTS}', '*',
                    'type', kind, 'data', data) then
    redis.call('XADD', stream, 'MAXLEN', '~', '{events.MAX_EVENTS}', '*', 'type', kind, 'data', data)
    local ttl = redis.call('TTL', job_key)
    if ttl > 0 then redis.call('EXPIRE', stream, ttl) end
  end
  if ({_TERMINAL_EVENTS_LUA})[kind] then tally_batch(batch, outbox, kind) end
  hook_out(outbox, job_id, kind, data, request)
end
"""
)

# Shared preamble. KEYS[1]: job hash; ARGV[1]: JSON attempt token the record must
# hold ('' to skip the check). Sets `status` for callers to use. One HMGET: every record has a
# `status`, so none means no record.
_GUARD = f"""
local guard = redis.call('HMGET', KEYS[1], 'status', 'attempt_token')
local status = guard[1]
if not status then return {{0}} end
if ARGV[1] ~= '' and guard[2] ~= ARGV[1] then return {{-1}} end
local terminal = {{{_TERMINAL_JSON}}}
if terminal[status] then return {{-2}} end
"""

# ARGV[2]: TTL to set on the record ('0' keeps it); ARGV[3..]: field, value pairs.
_UPDATE = (
    _GUARD
    + """
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
if ARGV[2] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return {1}
"""
)

# _GUARD that also reads the record's ``request`` and ``batch`` (guard[3], guard[4]) for emit_known.
_GUARD_READING = _GUARD.replace("'attempt_token')", "'attempt_token', 'request', 'batch')", 1)

# KEYS[2]: the running index; KEYS[3]: the job's event stream; KEYS[4]: the outbox; KEYS[5]: the
# job's preview; KEYS[6..]: result keys (images, journeys). ARGV[2]: record TTL; ARGV[3]: result
# TTL; ARGV[4]: job id; ARGV[5]: terminal event type; ARGV[6]: its data JSON; ARGV[7]: seconds the
# event stream and the preview live from now ('0': the stream the record's TTL, the preview its
# own); ARGV[8]: number of field/value strings that follow; then those strings; then one value
# per result key.
_FINISH = (
    _EMIT
    + _GUARD_READING
    + """
local nfields = tonumber(ARGV[8])
redis.call('HSET', KEYS[1], unpack(ARGV, 9, 8 + nfields))
for i = 6, #KEYS do
  redis.call('SET', KEYS[i], ARGV[8 + nfields + i - 5], 'EX', ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[4])
emit_known(KEYS[1], KEYS[3], KEYS[4], ARGV[4], ARGV[5], ARGV[6], guard[3], guard[4])
if ARGV[7] ~= '0' then
  redis.call('EXPIRE', KEYS[3], ARGV[7])
  redis.call('EXPIRE', KEYS[5], ARGV[7])
else
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return {1}
"""
)

# Hand a running job back to its RQ queue list (its worker died, or is shutting down), or, once
# it has lost ``max_attempts`` workers, fail it with ``worker_lost``: one step, so a job is never
# left queued in diffq but in no queue. KEYS[2]: the running index; KEYS[3]: the job's event
# stream; KEYS[4]: the outbox; KEYS[5]: RQ's queue list. ARGV[2]: job id; ARGV[3]: 1 to count the
# attempt as lost; ARGV[4]: reason; ARGV[5]: most lost attempts (0: no limit); ARGV[6]: unused;
# ARGV[7]: finished_at JSON; ARGV[8]: error message if it fails.
# Returns {1, lost attempts, 1 if it failed else 0}.
_REQUEUE = (
    _EMIT
    + _GUARD
    + f"""
local lost = tonumber(redis.call('HGET', KEYS[1], 'lost_attempts') or '0') + tonumber(ARGV[3])
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
redis.call('ZREM', KEYS[2], ARGV[2])
local limit = tonumber(ARGV[5])
if limit > 0 and lost >= limit then
  local error = {{code = '{ErrorCode.WORKER_LOST.value}', message = ARGV[8]}}
  redis.call('HSET', KEYS[1], 'status', '{json.dumps(JobStatus.FAILED.value)}', 'lost_attempts', tostring(lost),
             'progress', 'null', 'finished_at', ARGV[7], 'error', cjson.encode(error))
  emit(KEYS[1], KEYS[3], KEYS[4], ARGV[2], 'failed',
       cjson.encode({{status = 'failed', error = error, images = 0}}))
  return {{1, lost, 1}}
end
redis.call('HSET', KEYS[1], 'status', '{json.dumps(JobStatus.QUEUED.value)}', 'attempt_token', 'null',
           'worker', 'null', 'progress', 'null', 'lost_attempts', tostring(lost))
redis.call('LPUSH', KEYS[5], ARGV[2])
-- `attempt` (the one that ended) keeps this event's webhook-id apart from the first `queued`.
emit(KEYS[1], KEYS[3], KEYS[4], ARGV[2], 'queued',
     cjson.encode({{status = 'queued', reason = ARGV[4], attempt = attempt, lost_attempts = lost}}))
return {{1, lost, 0}}
"""
)

# KEYS[2]: the running index; KEYS[3]: the job's event stream; KEYS[4]: the outbox. ARGV[1]: the
# new attempt token (JSON); ARGV[2]: claim time; ARGV[3]: job id; ARGV[4]: the fair zsets' key
# prefix (the job leaves its model queue's fair order here, so the next submit finds no stale
# entry to drop, ``rq_adapter._FAIR_PUSH_FN``; a job that never had a place is not in it); ARGV[5..]:
# field, value pairs to set; the attempt counter is incremented here, and the ``running`` event
# carries it. The record is read once (HGETALL): the guard, the attempt, the webhook and batch
# for the event, and the reply, which is {1, the record's fields and values as read, then those
# written} (later pairs win), so the caller gets the claimed record in one round trip.
_CLAIM_HEAD = f"""
local flat = redis.call('HGETALL', KEYS[1])
local record = {{}}
for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
if not record['status'] then return {{0}} end
if ({{{_TERMINAL_JSON}}})[record['status']] then return {{-2}} end
"""
_CLAIM_BODY = """
local attempt = tostring(tonumber(record['attempt'] or '0') + 1)
redis.call('HSET', KEYS[1], 'attempt', attempt, 'attempt_token', ARGV[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
if record['model'] then redis.call('ZREM', ARGV[4] .. cjson.decode(record['model']), ARGV[3]) end
emit_known(KEYS[1], KEYS[3], KEYS[4], ARGV[3], 'running', cjson.encode({attempt = tonumber(attempt)}),
           record['request'], record['batch'])
local result = {1}
for _, v in ipairs(flat) do result[#result + 1] = v end
for _, v in ipairs({'attempt', attempt, 'attempt_token', ARGV[1]}) do result[#result + 1] = v end
for i = 5, #ARGV do result[#result + 1] = ARGV[i] end
return result
"""
_CLAIM = _EMIT + _CLAIM_HEAD + _CLAIM_BODY

# Claim a job still waiting in RQ's queue list (KEYS[5]) and take it off that list, in one step:
# how a worker adds queued jobs to a batch. {-3}: no longer on the list (another worker has it);
# a missing or ended record is left on the list for RQ's own path.
_CLAIM_QUEUED = (
    _EMIT + _CLAIM_HEAD + "if redis.call('LREM', KEYS[5], 1, ARGV[3]) == 0 then return {-3} end\n" + _CLAIM_BODY
)


# Cancel. Queued: canceled at once, with its event. Running: flagged, and the job id published on
# ``keys.STOPS`` (ARGV[4]) so that its worker checks the record at its next step (``diffq.worker.stops``).
# KEYS[2]: the job's event stream; KEYS[3]: the outbox. ARGV[3]: job id.
# Returns {code, status JSON}: 1 canceled now, 2 flagged, -2 already ended, 0 missing.
_CANCEL = (
    _EMIT
    + f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {{0, ''}} end
local status = redis.call('HGET', KEYS[1], 'status')
local terminal = {{{_TERMINAL_JSON}}}
if terminal[status] then return {{-2, status}} end
if status == '{json.dumps(JobStatus.QUEUED.value)}' then
  redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2])
  emit(KEYS[1], KEYS[2], KEYS[3], ARGV[3], 'canceled', '{{"status":"canceled","images":0}}')
  return {{1, status}}
end
redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
redis.call('PUBLISH', ARGV[4], ARGV[3])
return {{2, status}}
"""
)

# Between two denoising steps of a run: may it go on, and if so write what is due (its progress,
# its preview), each with its event, in one step. KEYS[2]: the job's event stream (its TTL was set
# with the `running` event and XADD keeps it); KEYS[3]: the preview PNG's key. ARGV[2]: progress
# JSON (the record's field and the event's data), '' if none is due; ARGV[3]: events kept in the
# stream; ARGV[4]: preview PNG, '' if none is due; ARGV[5]: the record's `preview` field JSON;
# ARGV[6]: the preview event's data; ARGV[7]: the PNG's TTL. {2}: a client asked to cancel
# (nothing written).
_STEP = f"""
local run = redis.call('HMGET', KEYS[1], 'status', 'attempt_token', 'cancel_requested')
if not run[1] then return {{0}} end
if run[2] ~= ARGV[1] then return {{-1}} end
if ({{{_TERMINAL_JSON}}})[run[1]] then return {{-2}} end
if run[3] == 'true' then return {{2}} end
if ARGV[2] ~= '' and ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'progress', ARGV[2], 'preview', ARGV[5])
elseif ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'progress', ARGV[2])
elseif ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'preview', ARGV[5])
end
if ARGV[2] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', 'progress', 'data', ARGV[2])
end
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[7])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', 'preview', 'data', ARGV[6])
end
return {{1}}
"""

# Fail a job only while it is still queued (deadlines), with its event. KEYS[2]: the job's event
# stream; KEYS[3]: the outbox. ARGV[1]: job id; ARGV[2]: event data; ARGV[3]: unused;
# ARGV[4..]: field, value pairs.
_FAIL_QUEUED = (
    _EMIT
    + f"""
if redis.call('HGET', KEYS[1], 'status') ~= '{json.dumps(JobStatus.QUEUED.value)}' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
emit(KEYS[1], KEYS[2], KEYS[3], ARGV[1], 'failed', ARGV[2])
return 1
"""
)

# Set a job going again that a worker took off its queue list but never claimed (it died in
# between): still queued, no attempt token, in RQ's intermediate list (KEYS[2]) or only in RQ's
# started registry, and not on the queue list (KEYS[3]). It goes back to the front of the list.
# ARGV[1]: job id. Returns 1 if re-queued, 0 if it no longer needs it.
_RESCUE = f"""
if redis.call('HGET', KEYS[1], 'status') ~= '{json.dumps(JobStatus.QUEUED.value)}' then
  redis.call('LREM', KEYS[2], 0, ARGV[1])
  return 0
end
local token = redis.call('HGET', KEYS[1], 'attempt_token')
if token and token ~= 'null' then return 0 end
redis.call('LREM', KEYS[2], 0, ARGV[1])
if redis.call('LPOS', KEYS[3], ARGV[1]) then return 0 end
redis.call('LPUSH', KEYS[3], ARGV[1])
return 1
"""


# Create many new job records (a chunk of a batch) with their ``queued`` events. ARGV[1]: record
# TTL (also the streams'); ARGV[2]: the job key prefix; ARGV[3]: the queued event's data; ARGV[4]:
# the number s of field/value strings every record shares, then those strings; then the number o
# of fields each record has its own value of, then their names; then per job: its id and its o
# values. A record that exists already is left as it is (ids are fresh, so only a repeat of the
# same call meets one).
_CREATE_MANY = f"""
local s = tonumber(ARGV[4])
local o = tonumber(ARGV[5 + s])
local own = {{}}
local made = 0
for i = 6 + s + o, #ARGV, 1 + o do
  local key = ARGV[2] .. ARGV[i]
  if redis.call('EXISTS', key) == 0 then
    for j = 1, o do
      own[2 * j - 1] = ARGV[5 + s + j]
      own[2 * j] = ARGV[i + j]
    end
    redis.call('HSET', key, unpack(ARGV, 5, 4 + s))
    redis.call('HSET', key, unpack(own))
    redis.call('EXPIRE', key, ARGV[1])
    local stream = key .. ':events'
    redis.call('XADD', stream, 'MAXLEN', '~', '{events.MAX_EVENTS}', '*', 'type', 'queued', 'data', ARGV[3])
    redis.call('EXPIRE', stream, ARGV[1])
    made = made + 1
  end
end
return made
"""

# Submit one job (``JobStore.submit``): every check and write of an accepted job in one round trip.
# First, when asked, one request against the API key's rate (``diffq.app.contract.rate``): refused or
# revoked, nothing else happens ({'rate', the hit's reply...}). Then
# refuses, writing nothing, if its Idempotency-Key is taken ({'taken', stored JSON}), its model has
# no live worker or another registration than the one checked ({'unserved'}), the model's queue is
# at its depth ({'full', depth}) or the owner has its cap of queued jobs ({'quota'}). Else writes the key,
# the owner's queued set, the record,
# RQ's job hash and its fair place in RQ's queue list, the ``queued`` event (and its webhook's
# outbox entry), the owner's job index; returns {'ok', position in the queue list (-1: taken
# already), the rate hit's 4 values (1, 0, 0, 0 when not asked), the model's recent durations...}.
# KEYS: 1 record, 2 event stream, 3 outbox, 4 RQ queue list, 5 fair zset, 6 fair state, 7 RQ job
# hash, 8 RQ's set of queues (not written: the model's workers list its queue there when they
# register, ``Registry.announce``), 9 owner's queued set, 10 owner's job index, 11 Idempotency-Key,
# 12 model's durations, 13 model's registration, 14 the API key's record (rate only), 15 the
# model's deadline index.
# ARGV: 1 job id, 2 record TTL, 3 queue depth (0: none), 4 queued cap (0: none), 5 owner, 6 class,
# 7 job-record key prefix, 8 RQ job TTL, 9 Idempotency-Key value ('': none), 10 its TTL, 11 index
# score (the API's clock, also the fair keys' renewal clock), 12 index size (trimmed to it on one
# submit in 16), 13 queued event data, 14 the model's registration as checked ('': any), 15 the
# rate's counter prefix ('': no rate hit), 16 its limit, 17 its window, 18 the API's clock, 19 the
# job's deadline in unix seconds ('': none; else it goes in the deadline index), 20 n record
# strings, then them, then RQ's strings.
_SUBMIT = (
    _EMIT
    + rq_adapter.FAIR_PUSH_FN
    + rate.HIT_FN
    + """
local id, ttl = ARGV[1], ARGV[2]
local hit = {1, 0, 0, 0}
if ARGV[15] ~= '' then
  hit = rate_hit(KEYS[14], ARGV[15], tonumber(ARGV[16]), tonumber(ARGV[17]), ARGV[18])
  if hit[1] ~= 1 then return {'rate', unpack(hit)} end
end
if ARGV[9] ~= '' then
  local existing = redis.call('GET', KEYS[11])
  if existing then return {'taken', existing} end
end
local registered = redis.call('GET', KEYS[13])
if not registered or (ARGV[14] ~= '' and registered ~= ARGV[14]) then return {'unserved'} end
local depth = tonumber(ARGV[3])
if depth > 0 then
  local queued = redis.call('LLEN', KEYS[4])
  if queued >= depth then return {'full', queued} end
end
local cap = tonumber(ARGV[4])
if cap > 0 then
  if redis.call('SCARD', KEYS[9]) >= cap then
    for _, other in ipairs(redis.call('SMEMBERS', KEYS[9])) do
      if redis.call('HGET', ARGV[7] .. other, 'status') ~= '"queued"' then redis.call('SREM', KEYS[9], other) end
    end
    if redis.call('SCARD', KEYS[9]) >= cap then return {'quota'} end
  end
  redis.call('SADD', KEYS[9], id)
  redis.call('EXPIRE', KEYS[9], ttl)
end
if ARGV[9] ~= '' then redis.call('SET', KEYS[11], ARGV[9], 'EX', ARGV[10]) end
local n = tonumber(ARGV[20])
redis.call('HSET', KEYS[1], unpack(ARGV, 21, 20 + n))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('HSET', KEYS[7], unpack(ARGV, 21 + n))
redis.call('EXPIRE', KEYS[7], ARGV[8])
fair_push(KEYS[4], KEYS[5], KEYS[6], id, ARGV[5], ARGV[6], ttl, ARGV[7], ARGV[11])
local request = nil
for i = 21, 20 + n, 2 do
  if ARGV[i] == 'request' then request = ARGV[i + 1] break end
end
emit_made(KEYS[2], KEYS[3], id, 'queued', ARGV[13], ttl, request)
if ARGV[19] ~= '' then
  redis.call('ZADD', KEYS[15], ARGV[19], id)
  redis.call('EXPIRE', KEYS[15], ttl)
end
redis.call('ZADD', KEYS[10], ARGV[11], id)
if string.sub(id, -1) == '0' then  -- one submit in 16 (ids are random hex): the index holds ~16 over its size
  redis.call('ZREMRANGEBYRANK', KEYS[10], 0, -tonumber(ARGV[12]) - 1)
end
redis.call('EXPIRE', KEYS[10], ttl)
local result = {'ok', redis.call('LPOS', KEYS[4], id) or -1, hit[1], hit[2], hit[3], hit[4]}
for _, d in ipairs(redis.call('LRANGE', KEYS[12], 0, -1)) do result[#result + 1] = d end
return result
"""
)

# Read a job for a client (``JobStore.read``) in one round trip: the record's fields, its TTL in ms,
# and, while it is queued, its place in its model's RQ queue list (-1: being taken) and the
# model's recent job durations. KEYS[1]: the record. ARGV: 1 job id, 2 RQ queue-list key prefix,
# 3 and 4 the durations key's prefix and suffix (around the model's name).
# Returns {} for no record, else {pttl, position, n field strings, them..., durations...}.
_READ = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {} end
local result = {redis.call('PTTL', KEYS[1]), -1, #fields}
local record = {}
for i, v in ipairs(fields) do
  result[#result + 1] = v
  if i % 2 == 0 then record[fields[i - 1]] = v end
end
if record['status'] ~= '"queued"' then return result end
local model = cjson.decode(record['model'])
result[2] = redis.call('LPOS', ARGV[2] .. model, ARGV[1]) or -1
for _, d in ipairs(redis.call('LRANGE', ARGV[3] .. model .. ARGV[4], 0, -1)) do result[#result + 1] = d end
return result
"""

#: Records per ``_CREATE_MANY`` call.
CREATE_CHUNK = 500


#: The fields in which new records of one batch differ; ``create_many`` encodes and sends the rest once.
_PER_ITEM = ("id", "created_at", "warnings", "batch", "request")


class CancelResult(IntEnum):
    """What ``JobStore.cancel`` did."""

    CANCELED = 1  # it was queued: it is canceled now and will never run
    REQUESTED = 2  # it is running: its worker stops at the next denoising step
    ENDED = -2  # it had already ended (succeeded, failed or canceled)
    MISSING = 0


class RunCheck(IntEnum):
    """What a running attempt learns from its record between two denoising steps."""

    GO_ON = 1
    CANCEL = 2  # a client asked to cancel
    MISSING = 0  # deleted or expired
    STALE = -1  # another attempt owns the job now
    ENDED = -2


class WriteResult(IntEnum):
    """What a guarded write did; anything but ``WRITTEN`` means the caller must stop."""

    WRITTEN = 1
    MISSING = 0  # deleted or expired: the client no longer wants it
    STALE = -1  # another attempt owns the job now
    ENDED = -2  # the job already reached a terminal status


@dataclass(frozen=True)
class PreviewWrite:
    """A running job's latest preview, to store with its ``preview`` event (``JobStore.step``)."""

    png: bytes
    info: dict[str, Any]  # the record's `preview` field: step, total, sha256
    ttl: int


@dataclass(frozen=True)
class Submitted:
    """What ``JobStore.submit`` did: ``outcome`` "ok", or why nothing was written ("rate": the key's
    rate refused it or the key is revoked, ``rate`` says which; "taken": the Idempotency-Key's stored
    JSON in ``detail``; "unserved"; "full": the queue's depth in ``detail``; "quota")."""

    outcome: str
    detail: bytes | int | None = None
    position: int | None = None  # in RQ's queue list; None: a worker is already taking it
    durations: list[bytes] | None = None  # the model's recent job durations
    rate: list[int] | None = None  # the rate hit's reply (``diffq.app.contract.rate``), when one was asked


@dataclass(frozen=True)
class Read:
    """A record as ``JobStore.read`` found it."""

    record: JobRecord
    pttl_ms: int | None  # until the record expires; None: no TTL
    position: int | None  # in its queue list while queued; None: not queued, or being taken
    durations: list[bytes]  # the model's recent job durations, while queued


@dataclass(frozen=True)
class StoredImage:
    """PNG bytes to store for image ``index`` of a job."""

    index: int
    png: bytes


class JobStore:
    """Reads and guarded writes of job records and their images."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._update = script(redis, _UPDATE)
        self._finish = script(redis, _FINISH)
        self._claim = script(redis, _CLAIM)
        self._claim_queued = script(redis, _CLAIM_QUEUED)
        self._cancel = script(redis, _CANCEL)
        self._requeue = script(redis, _REQUEUE)
        self._fail_queued = script(redis, _FAIL_QUEUED)
        self._rescue = script(redis, _RESCUE)
        self._step = script(redis, _STEP)
        self._create_many = script(redis, _CREATE_MANY)
        self._submit = script(redis, _SUBMIT)
        self._read = script(redis, _READ)

    def create(
        self, record: JobRecord, ttl: int, pipeline: Pipeline | None = None, inputs: dict[str, bytes] | None = None
    ) -> None:
        """Write a new record and its input PNGs; pass the pipeline that also enqueues it so
        all happen or none."""
        target = pipeline if pipeline is not None else self.redis.pipeline()
        for name, png in (inputs or {}).items():
            target.set(keys.job_input(record.id, name), png, ex=ttl)
        target.hset(keys.job(record.id), mapping=record.to_hash())
        target.expire(keys.job(record.id), ttl)
        if pipeline is None:
            target.execute()

    def create_many(self, records: Sequence[JobRecord], ttl: int, pipeline: Pipeline) -> None:
        """``create`` many new records (a batch's items), each with its ``queued`` event, in one
        script call per ``CREATE_CHUNK``; their webhooks' ``queued`` deliveries (if asked) go in
        ``pipeline`` too. Fields the records share (all but ``_PER_ITEM``) are encoded and sent once
        per call."""
        if not records:
            return
        shared = _flatten(encode_fields(records[0].model_dump(mode="json", exclude=set(_PER_ITEM))))
        data = json.dumps({"status": "queued"}, separators=(",", ":"))
        head = [ttl, keys.job(""), data, len(shared), *shared, len(_PER_ITEM), *_PER_ITEM]
        for start in range(0, len(records), CREATE_CHUNK):
            args: list[Any] = list(head)
            for record in records[start : start + CREATE_CHUNK]:
                own = encode_fields(record.model_dump(mode="json", include=set(_PER_ITEM[:-1])))
                own["request"] = record.request.model_dump_json()  # the big one: pydantic's encoder, not json's
                args += [record.id, *(own[name] for name in _PER_ITEM)]
                hook = record.request.webhook
                if hook is not None and "queued" in hook.events:  # the event itself is the script's
                    queued = {"status": "queued"}
                    webhook_queue.schedule(
                        pipeline,
                        record.id,
                        hook.url,
                        "job.queued",
                        events.webhook_data(record.id, "queued", queued),
                        events.webhook_id(record.id, "queued", queued),
                    )
            self._create_many(keys=[], args=args, client=pipeline)
        timed = {r.id: deadline.timestamp() for r in records if (deadline := r.request.deadline_at) is not None}
        if timed:  # the deadline index (``keys.deadlines``), as ``_SUBMIT`` writes it for one job
            index = keys.deadlines(records[0].model)
            pipeline.zadd(index, timed)
            pipeline.expire(index, ttl)

    def submit(
        self,
        record: JobRecord,
        ttl: int,
        queue: tasks.FairQueue,
        rq_fields: Sequence[Any],
        *,
        registration: bytes | None,
        max_depth: int | None,
        queued_cap: int | None,
        idempotency: tuple[str, str, int] | None,
        rq_ttl: int,
    ) -> Submitted:
        """Create a new job and queue it (``_SUBMIT``), or refuse and write nothing. ``max_depth``:
        most jobs the model's queue may hold; ``queued_cap``: most queued jobs of the owner (the
        owner's queued set is ``queue.place.owner``'s); ``idempotency``: (Redis key, value, TTL) of
        an Idempotency-Key to reserve with the job; ``rq_fields``: RQ's job hash
        (``tasks.rq_job_fields``)."""
        call = _submit_call(record, ttl, queue, rq_fields, registration, max_depth, queued_cap, idempotency, rq_ttl)
        return _submitted(self._submit(**call))

    async def submit_async(
        self,
        quick: AsyncRedis,
        record: JobRecord,
        ttl: int,
        queue: tasks.FairQueue,
        rq_fields: Sequence[Any],
        *,
        registration: bytes | None,
        max_depth: int | None,
        queued_cap: int | None,
        rq_ttl: int,
        rate: tuple[str, Sequence[Any]] | None = None,
    ) -> Submitted:
        """``submit`` (without an Idempotency-Key) through ``quick``, an asyncio client: the same one
        script, from the event loop. ``rate``: (the API key's record, ``rate_hit``'s prefix, limit and
        window) to count this request against the key's rate first, in the same round trip."""
        call = _submit_call(record, ttl, queue, rq_fields, registration, max_depth, queued_cap, None, rq_ttl, rate)
        return _submitted(await script(quick, _SUBMIT)(**call))

    def read(self, job_id: str) -> Read | None:
        """The record with what a client's view of it needs (``_READ``), in one round trip; ``None``
        if there is no record."""
        return _read_reply(self._read(**_read_call(job_id)))

    @staticmethod
    async def read_async(quick: AsyncRedis, job_id: str) -> Read | None:
        """``read`` through ``quick``, an asyncio client, from the event loop."""
        return _read_reply(await script(quick, _READ)(**_read_call(job_id)))

    def get(self, job_id: str) -> JobRecord | None:
        """The record, or ``None`` if there is none (never created, deleted or expired)."""
        fields = self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_hash(fields) if fields else None

    def image(self, job_id: str, index: int) -> bytes | None:
        """PNG bytes of one image, or ``None`` once they have expired."""
        return self.redis.get(keys.image(job_id, index))

    def job_input(self, job_id: str, name: str) -> bytes | None:
        """An editing job's input PNG ("image" or "mask"), or ``None`` if it has none (or expired)."""
        return self.redis.get(keys.job_input(job_id, name))

    def delete(self, job_id: str) -> bool:
        """Remove the record, its inputs and all its images; ``False`` if there was no record."""
        raw, status = self.redis.hmget(keys.job(job_id), "request", "status")
        if raw is None:
            return False
        num_images = int(json.loads(raw).get("num_images", 1))
        names = [
            keys.job(job_id),
            keys.events(job_id),
            keys.preview(job_id),
            *(keys.image(job_id, n) for n in range(num_images)),
            *(keys.journey(job_id, n) for n in range(num_images)),
            *(keys.job_input(job_id, name) for name in keys.INPUT_NAMES),
        ]
        self.redis.zrem(keys.RUNNING, job_id)
        deleted = bool(self.redis.delete(*names))
        if _is_running(status):
            self.redis.publish(keys.STOPS, job_id)  # its worker stops at its next step (``diffq.worker.stops``)
        return deleted

    def claim(self, job_id: str, worker_id: str, token: str) -> JobRecord | None:
        """Mark a job running under a new attempt, with its ``running`` event; ``None`` if it is
        gone or already ended."""
        job_key, stream, outbox = self._event_keys(job_id)
        return self._claimed(self._claim, [job_key, keys.RUNNING, stream, outbox], job_id, worker_id, token)

    def claim_queued(self, job_id: str, queue_key: str, worker_id: str, token: str) -> JobRecord | None:
        """``claim`` a job that waits in RQ's queue list ``queue_key`` and take it off the list, atomically
        (a worker batching it with the job it runs). ``None``, leaving the list as it was, if another
        worker took it first or its record is gone or ended."""
        job_key, stream, outbox = self._event_keys(job_id)
        return self._claimed(
            self._claim_queued, [job_key, keys.RUNNING, stream, outbox, queue_key], job_id, worker_id, token
        )

    def _claimed(
        self, script: Any, script_keys: list[str], job_id: str, worker_id: str, token: str
    ) -> JobRecord | None:
        fields = encode_fields(
            {
                "status": JobStatus.RUNNING.value,
                "worker": worker_id,
                "started_at": utcnow().isoformat(),
                "finished_at": None,
                "progress": None,
                "error": None,
            }
        )
        args = [json.dumps(token), str(time.time()), job_id, _FAIR_PREFIX, *_flatten(fields)]
        reply = script(keys=script_keys, args=args)
        if int(reply[0]) != WriteResult.WRITTEN:
            return None
        pairs = reply[1:]
        return JobRecord.from_hash(dict(zip(pairs[::2], pairs[1::2], strict=True)))

    @staticmethod
    def _event_keys(job_id: str) -> tuple[str, str, str]:
        """The record, the event stream and the outbox: what a script that emits an event writes."""
        return keys.job(job_id), keys.events(job_id), OUTBOX

    def update(self, job_id: str, token: str | None, values: dict[str, Any], ttl: int = 0) -> WriteResult:
        """Set some fields of a live record, if ``token`` (when given) still owns it."""
        args = [_token_arg(token), str(ttl), *_flatten(encode_fields(values))]
        return WriteResult(int(self._update(keys=[keys.job(job_id)], args=args)[0]))

    def finish(
        self,
        job_id: str,
        token: str | None,
        values: dict[str, Any],
        images: Sequence[StoredImage],
        job_ttl: int,
        result_ttl: int,
        blobs: Mapping[str, bytes] | None = None,
        event_data: Mapping[str, Any] | None = None,
        events_ttl: int = 0,
    ) -> WriteResult:
        """End a job: store its images (and other results, ``blobs`` by key), its final fields
        and its terminal event (``values["status"]``, with ``event_data``) together, or nothing at all.
        ``events_ttl`` > 0: the job's event stream and preview then live that many seconds (0: the
        stream lives as long as the record)."""
        fields = _flatten(encode_fields(values))
        stored = {keys.image(job_id, image.index): image.png for image in images} | dict(blobs or {})
        data: dict[str, Any] = {
            "status": values["status"],
            **{key: values[key] for key in ("error", "seeds") if key in values},
            "images": len(images) or len(values.get("images", [])),
            **(event_data or {}),
        }
        job_key, stream, outbox = self._event_keys(job_id)
        reply = self._finish(
            keys=[job_key, keys.RUNNING, stream, outbox, keys.preview(job_id), *stored],
            args=[
                _token_arg(token),
                str(job_ttl),
                str(result_ttl),
                job_id,
                values["status"],
                _compact(data),
                str(events_ttl),
                str(len(fields)),
                *fields,
                *stored.values(),
            ],
        )
        return WriteResult(int(reply[0]))

    def requeue(
        self,
        job_id: str,
        token: str | None,
        queue_key: str,
        *,
        lost: bool,
        reason: str,
        max_attempts: int = 0,
        lost_message: str = "",
    ) -> tuple[WriteResult, int, bool]:
        """Put a running job back to ``queued`` and onto the front of RQ's queue list ``queue_key``,
        with its ``queued`` event, in one step. ``lost`` counts the attempt towards ``max_attempts``
        (0: no limit); the attempt that reaches it fails the job ``worker_lost`` (``lost_message``)
        instead. Returns what happened, the lost attempts so far, and whether it failed."""
        job_key, stream, outbox = self._event_keys(job_id)
        reply = self._requeue(
            keys=[job_key, keys.RUNNING, stream, outbox, queue_key],
            args=[
                _token_arg(token),
                job_id,
                "1" if lost else "0",
                reason,
                str(max_attempts),
                "",
                json.dumps(utcnow().isoformat()),
                lost_message,
            ],
        )
        result = WriteResult(int(reply[0]))
        return result, int(reply[1]) if len(reply) > 1 else 0, len(reply) > 2 and int(reply[2]) == 1

    def expire_if_queued(self, job_id: str, event_ttl: int = 0) -> bool:
        """Fail a job still queued past its deadline (it never ran), with its event; False if it
        is no longer queued. The caller takes it off RQ's queue."""
        error = {"code": "deadline_exceeded", "message": "still queued when its deadline passed"}
        values = {"status": "failed", "finished_at": utcnow().isoformat(), "error": error}
        job_key, stream, outbox = self._event_keys(job_id)
        data = _compact({"status": "failed", "error": error, "images": 0})
        return bool(
            self._fail_queued(keys=[job_key, stream, outbox], args=[job_id, data, "", *_flatten(encode_fields(values))])
        )

    def rescue(self, job_id: str, intermediate_key: str, queue_key: str) -> bool:
        """Put a job that a dead worker took off its queue list but never claimed back on the list
        (``_RESCUE``); False if it does not need it (claimed, ended, gone, or queued already)."""
        return bool(self._rescue(keys=[keys.job(job_id), intermediate_key, queue_key], args=[job_id]))

    def running(self) -> list[tuple[str, float]]:
        """(job id, claimed at unix time) of every job a worker has claimed and not ended."""
        return [(member.decode(), score) for member, score in self.redis.zrange(keys.RUNNING, 0, -1, withscores=True)]

    def cancel(self, job_id: str, finished_at: str) -> tuple[CancelResult, JobStatus | None]:
        """Cancel a queued job (with its ``canceled`` event), or flag a running one; returns what
        happened and the status it had."""
        job_key, stream, outbox = self._event_keys(job_id)
        code, status = self._cancel(
            keys=[job_key, stream, outbox],
            args=[json.dumps(JobStatus.CANCELED.value), json.dumps(finished_at), job_id, keys.STOPS],
        )
        return CancelResult(int(code)), JobStatus(json.loads(status)) if status else None

    def cancel_many(self, job_ids: Sequence[str], finished_at: str) -> list[CancelResult]:
        """``cancel`` each of ``job_ids`` (a batch's items) in one round trip: the same script per job."""
        status = json.dumps(JobStatus.CANCELED.value)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                job_key, stream, outbox = self._event_keys(job_id)
                self._cancel(
                    keys=[job_key, stream, outbox],
                    args=[status, json.dumps(finished_at), job_id, keys.STOPS],
                    client=pipe,
                )
            replies = pipe.execute()
        return [CancelResult(int(reply[0])) for reply in replies]

    def delete_many(self, job_ids: Sequence[str]) -> None:
        """``delete`` each of ``job_ids`` (a batch's items) in two round trips."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(keys.job(job_id), "request", "status")
            requests = pipe.execute()
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id, (raw, status) in zip(job_ids, requests, strict=True):
                if _is_running(status):
                    pipe.publish(keys.STOPS, job_id)
                count = int(json.loads(raw).get("num_images", 1)) if raw is not None else 0
                pipe.delete(
                    keys.job(job_id),
                    keys.events(job_id),
                    keys.preview(job_id),
                    *(keys.image(job_id, n) for n in range(count)),
                    *(keys.journey(job_id, n) for n in range(count)),
                    *(keys.job_input(job_id, name) for name in keys.INPUT_NAMES),
                )
            if job_ids:
                pipe.zrem(keys.RUNNING, *job_ids)
            pipe.execute()

    def check(self, job_id: str, token: str) -> RunCheck:
        """One round trip between denoising steps: may this attempt go on?"""
        return _run_check(token, *self.redis.hmget(keys.job(job_id), "status", "attempt_token", "cancel_requested"))

    def step(
        self,
        runs: Sequence[
            tuple[str, str, dict[str, Any] | None] | tuple[str, str, dict[str, Any] | None, PreviewWrite | None]
        ],
    ) -> list[RunCheck]:
        """Between two denoising steps of one or more running jobs (a batch), in one round trip:
        for each ``(job id, attempt token, progress or None[, preview or None])``, may the attempt
        go on (``check``)? Where it may, the progress and preview given are written to the record
        (the preview's PNG to its key) and published as ``progress`` and ``preview`` events, by one
        guarded script per job (``_STEP``); a job with nothing to write costs one HMGET."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id, token, progress, *preview in runs:
                if progress is None and not any(preview):
                    pipe.hmget(keys.job(job_id), "status", "attempt_token", "cancel_requested")
                else:
                    # EVALSHA without redis-py's per-pipeline SCRIPT EXISTS round trip; see NOSCRIPT below.
                    pipe.evalsha(self._step.sha, 3, *self._step_call(job_id, token, progress, *preview))
            replies = pipe.execute(raise_on_error=False)
        checks = []
        for (job_id, token, progress, *preview), reply in zip(runs, replies, strict=True):
            if isinstance(reply, NoScriptError):  # first use, or Redis restarted: load it and run it alone
                arguments = self._step_call(job_id, token, progress, *preview)
                reply = self._step(keys=arguments[:3], args=arguments[3:])
            if isinstance(reply, Exception):
                raise reply
            if progress is None and not any(preview):
                checks.append(_run_check(token, *reply))
            else:
                code = int(reply[0])
                checks.append(RunCheck.GO_ON if code == WriteResult.WRITTEN else RunCheck(code))
        return checks

    @staticmethod
    def _step_call(
        job_id: str, token: str, progress: dict[str, Any] | None, preview: PreviewWrite | None = None
    ) -> list[Any]:
        shown = _compact(preview.info) if preview is not None else ""
        event = _compact({"step": preview.info["step"], "total": preview.info["total"]}) if preview is not None else ""
        return [
            keys.job(job_id),
            keys.events(job_id),
            keys.preview(job_id),
            _token_arg(token),
            _compact(progress) if progress is not None else "",
            str(events.MAX_EVENTS),
            preview.png if preview is not None else "",
            shown,
            event,
            str(preview.ttl if preview else 0),
        ]

    def preview(self, job_id: str) -> bytes | None:
        """The latest preview PNG, or ``None``."""
        return self.redis.get(keys.preview(job_id))

    def journey(self, job_id: str, index: int) -> bytes | None:
        """Image ``index``'s journey animation (WebP), or ``None``."""
        return self.redis.get(keys.journey(job_id, index))


def _submit_call(
    record: JobRecord,
    ttl: int,
    queue: tasks.FairQueue,
    rq_fields: Sequence[Any],
    registration: bytes | None,
    max_depth: int | None,
    queued_cap: int | None,
    idempotency: tuple[str, str, int] | None,
    rq_ttl: int,
    rate: tuple[str, Sequence[Any]] | None = None,
) -> dict[str, list[Any]]:
    """``_SUBMIT``'s keys and arguments (``JobStore.submit``)."""
    record_key, hit = rate if rate is not None else (keys.job(record.id), ("", 0, 0, ""))  # a placeholder: unread
    place = queue.place
    fields = _flatten(record.to_hash())
    # Without a key, KEYS[11] is a placeholder the script never touches.
    key, value, key_ttl = idempotency if idempotency is not None else (keys.job(record.id), "", 0)
    return {
        "keys": [
            keys.job(record.id),
            keys.events(record.id),
            OUTBOX,
            queue.key,
            keys.fair(queue.name),
            keys.fair_state(queue.name),
            queue.job_class.key_for(record.id),
            queue.redis_queues_keys,
            keys.owner_queued(place.owner),
            keys.owner_jobs(place.owner),
            key,
            keys.model_durations(record.model),
            keys.model(record.model),
            record_key,
            keys.deadlines(record.model),
        ],
        "args": [
            record.id,
            ttl,
            max_depth or 0,
            queued_cap or 0,
            place.owner,
            place.rank,
            keys.job(""),
            rq_ttl,
            value,
            key_ttl,
            record.created_at.timestamp(),
            keys.JOBS_INDEX_MAX,
            _compact({"status": "queued"}),
            registration or "",
            *hit,
            _deadline_score(record),
            len(fields),
            *fields,
            *rq_fields,
        ],
    }


def _deadline_score(record: JobRecord) -> str:
    """The job's deadline for the model's deadline index (unix seconds), '' if it has none."""
    deadline = record.request.deadline_at
    return repr(deadline.timestamp()) if deadline is not None else ""


def _submitted(reply: list[Any]) -> Submitted:
    outcome = reply[0].decode()
    if outcome == "rate":
        return Submitted(outcome, rate=[int(value) for value in reply[1:]])
    if outcome != "ok":
        return Submitted(outcome, detail=reply[1] if len(reply) > 1 else None)
    position = int(reply[1])
    hit = [int(value) for value in reply[2:6]]
    return Submitted(outcome, position=position if position >= 0 else None, durations=list(reply[6:]), rate=hit)


#: The fair zset of a model's queue is this and the model's name (``keys.fair`` of ``tasks.queue_name``).
_FAIR_PREFIX = keys.fair(tasks.QUEUE_PREFIX)

#: ``_READ``'s RQ queue-list key prefix, and the durations key's prefix and suffix.
_READ_ARGS = (
    f"{rq_adapter.Queue.redis_queue_namespace_prefix}{tasks.QUEUE_PREFIX}",
    *keys.model_durations("\n").split("\n"),
)


def _read_call(job_id: str) -> dict[str, list[Any]]:
    """``_READ``'s keys and arguments (``JobStore.read``)."""
    return {"keys": [keys.job(job_id)], "args": [job_id, *_READ_ARGS]}


def _read_reply(reply: list[Any]) -> Read | None:
    if not reply:
        return None
    pttl, position, count = int(reply[0]), int(reply[1]), int(reply[2])
    pairs = reply[3 : 3 + count]
    record = JobRecord.from_hash(dict(zip(pairs[::2], pairs[1::2], strict=True)))
    return Read(record, pttl if pttl > 0 else None, position if position >= 0 else None, list(reply[3 + count :]))


def _run_check(token: str, status: bytes | None, owner: bytes | None, cancel: bytes | None) -> RunCheck:
    """``check``'s verdict from the record's status, attempt token and cancel flag."""
    if status is None:
        return RunCheck.MISSING
    if owner is None or json.loads(owner) != token:
        return RunCheck.STALE
    if JobStatus(json.loads(status)).is_terminal:
        return RunCheck.ENDED
    return RunCheck.CANCEL if cancel is not None and json.loads(cancel) else RunCheck.GO_ON


def _is_running(status: bytes | str | None) -> bool:
    """Whether a record's raw ``status`` field says running (bytes, or text from a decoding client)."""
    return status is not None and (status if isinstance(status, bytes) else status.encode()) == _RUNNING_JSON


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _token_arg(token: str | None) -> str:
    return "" if token is None else json.dumps(token)


def _flatten(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]
