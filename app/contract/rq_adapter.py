"""diffq's adapter around RQ: every touch of RQ's API and of its keys is here, so upgrading RQ
(pinned in pyproject; contract tests in tests/test_rq_adapter.py) is one module.

What diffq asks of RQ:

- the one task workers run, enqueued by its dotted path (a string, so the API never imports the
  worker) with RQ's JSON serializer and the job id as its only argument: the request itself lives
  in diffq's job record; one queue per model, in a fair order (``FairQueue``), one job or many at
  once (``enqueue``, ``enqueue_many``);
- RQ's side of what diffq decides on its own record: a cancel (``cancel_queued``), a delete
  (``forget``), a job put back on the queue (``mark_requeued``), a lost job failed
  (``end_lost``), jobs dropped from a queue (``drop_many``);
- what a worker's batch needs of RQ's bookkeeping: a job taken along marked started as RQ marks
  the one it dequeued (``start_execution``), and ended through RQ's own handlers
  (``end_execution``); the order in which a worker dequeues its queues (``set_dequeue_order``);
- where RQ keeps what the sweeper and the claim script read: a worker's taken-but-not-started
  list (``intermediate_key``), the started registry (``started_ids``), queue depths.

diffq's status of a job is read from its record alone; ``rq_status`` is RQ's own view, for tests
and dashboards. The Lua scripts that take ids off RQ's lists in the same step as a claim stay with
every other guarded write in ``diffq.app.contract.store``; they get the list names from here.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import uuid4

from redis import Redis
from redis.client import Pipeline
from rq import Queue
from rq.exceptions import DeserializationError, InvalidJobOperation, NoSuchJobError, StopRequested
from rq.executions import Execution
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.suspension import WORKERS_SUSPENDED
from rq.timeouts import JobTimeoutException
from rq.utils import now, utcformat
from rq.worker import BaseWorker, SimpleWorker, WorkerStatus

from diffq.app.contract import keys
from diffq.app.contract.scripts import script
from diffq.app.contract.status import JobStatus

TASK = "diffq.worker.task.run_job"
"""Dotted path of the only function a diffq worker will execute."""

QUEUE_PREFIX = "diffq:"

#: How RQ's job hashes carry their arguments (never pickle): by the API, the worker and the tests.
SERIALIZER = JSONSerializer


def queue_name(model: str) -> str:
    """One queue per model, so a worker only ever dequeues jobs for the model it holds."""
    return f"{QUEUE_PREFIX}{model}"


def queue_key(model: str) -> str:
    """The Redis key of RQ's queue list for ``model`` (for reads that need no ``Queue`` object)."""
    return f"{Queue.redis_queue_namespace_prefix}{queue_name(model)}"


#: RQ's set of known queue lists (``rq info``, ``Queue.all``, ``queue_depths``). A worker adds the
#: queues of the models it serves with each registration (``Registry.announce``), so a submit,
#: which needs the model's registration anyway, does not add its queue itself.
RQ_QUEUES = Queue.redis_queues_keys


def model_queue(model: str, redis: Redis, place: Place | None = None) -> Queue:
    """The RQ queue of a model, with RQ's JSON serializer (never pickle). With ``place``, jobs
    enqueued through it take their owner's fair place in the queue instead of its end."""
    if place is not None:
        return FairQueue(queue_name(model), connection=redis, serializer=SERIALIZER, place=place)
    return Queue(queue_name(model), connection=redis, serializer=SERIALIZER)


@dataclass(frozen=True)
class Place:
    """Whose job is being queued, and in which priority class (0 high, 1 normal, 2 low)."""

    owner: str
    rank: int
    ttl: int  # seconds the fair-order bookkeeping lives after the latest submit


# Fair order within a queue. A queued job's place is (priority class, round): every class is
# served before the next one, and within a class, rounds in order, first come first served within
# a round. An owner's next job takes the round after its previous one, but never one before the
# earliest queued job of its class ("base"; with none queued, the highest round given so far).
# So an owner with nothing queued goes in the round being served now, and waits behind at most
# one job of each owner in that round and one in the next: with key A's 100 jobs queued,
# key B's new job starts after at most 2 more of A's.
#
# KEYS[1]: RQ's queue list. KEYS[2]: the queue's fair zset (job id -> class * SPAN + round).
# KEYS[3]: the fair state hash (owner's last round per class; the top round per class).
# ARGV: job id, owner, class, TTL, job record key prefix. Ids the zset still holds whose job is
# no longer queued (taken by a worker, canceled, deleted) are dropped when met: as the base, by
# the job record's status (no list scan); as the place to insert before, when LINSERT misses.
# ``now`` (a caller's clock, seconds; nil: renew every time): both keys' TTL is renewed when an
# eighth of it has passed since the state's ``renewed`` stamp, not at every push (2 commands). A
# zset that emptied (its key gone) and was made again may go without a TTL until then; it
# holds queued jobs only, and goes when they are taken.
_FAIR_PUSH_FN = """
local function fair_push(queue, zset, state, id, owner, rank, ttl, prefix, now)
  local SPAN = 1000000000000
  local rank = tonumber(rank)
  local low = rank * SPAN
  local base = nil
  while true do
    local first = redis.call('ZRANGEBYSCORE', zset, low, '(' .. (low + SPAN), 'WITHSCORES', 'LIMIT', 0, 1)
    if #first == 0 then break end
    if redis.call('HGET', prefix .. first[1], 'status') == '"queued"' then
      base = tonumber(first[2]) - low
      break
    end
    redis.call('ZREM', zset, first[1])
  end
  local last_field = 'last:' .. rank .. ':' .. owner
  local top_field = 'top:' .. rank
  local got = redis.call('HMGET', state, last_field, top_field, 'renewed')
  local last = tonumber(got[1] or '-1')
  local top = tonumber(got[2] or '0')
  local round = math.max(last + 1, base or top)
  local renew = ttl and (not now or not got[3] or tonumber(now) - tonumber(got[3]) >= tonumber(ttl) / 8)
  local fields = {last_field, round}
  if round > top then
    fields[#fields + 1] = top_field
    fields[#fields + 1] = round
  end
  if renew and now then
    fields[#fields + 1] = 'renewed'
    fields[#fields + 1] = now
  end
  redis.call('HSET', state, unpack(fields))
  local score = low + round
  while true do
    local after = redis.call('ZRANGEBYSCORE', zset, '(' .. score, '+inf', 'LIMIT', 0, 1)
    if #after == 0 then
      redis.call('RPUSH', queue, id)
      break
    end
    if redis.call('LINSERT', queue, 'BEFORE', after[1], id) > 0 then break end
    redis.call('ZREM', zset, after[1])
  end
  redis.call('ZADD', zset, score, id)
  if renew then  -- ttl nil: the caller renews both once for many jobs
    redis.call('EXPIRE', zset, ttl)
    redis.call('EXPIRE', state, ttl)
  end
  return score
end
"""

#: ``fair_push(queue, zset, state, id, owner, rank, ttl, prefix, now)`` for other scripts that queue a job.
FAIR_PUSH_FN = _FAIR_PUSH_FN

_FAIR_PUSH = (
    _FAIR_PUSH_FN
    + """
return fair_push(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
"""
)


class FairQueue(Queue):
    """RQ's queue, except that a new job is inserted at its owner's fair place (``_FAIR_PUSH``)
    rather than appended. Workers dequeue from the front as usual; jobs RQ puts at the front
    (``at_front``) and jobs enqueued by a plain ``Queue`` keep RQ's own placement."""

    def __init__(self, *args: Any, place: Place, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.place = place
        self._fair_push = script(self.connection, _FAIR_PUSH)

    def push_job_id(self, job_id: str, pipeline: Pipeline | None = None, at_front: bool = False) -> None:
        if at_front:
            super().push_job_id(job_id, pipeline=pipeline, at_front=True)
            return
        self._fair_push(
            keys=[self.key, keys.fair(self.name), keys.fair_state(self.name)],
            args=[job_id, self.place.owner, self.place.rank, self.place.ttl, keys.job("")],
            client=pipeline if pipeline is not None else self.connection,
        )


class JobTimes(Protocol):
    """How long a job may run and live: the fields of the deployment's settings (``diffq.app.settings.Settings``)
    RQ is told, so that the contract does not import the API's settings."""

    @property
    def job_timeout(self) -> int: ...
    @property
    def job_ttl(self) -> int: ...


#: Seconds RQ keeps a job that succeeded (its job hash, result and finished-registry entry).
FINISHED_TTL = 300


def enqueue(queue: Queue, job_id: str, settings: JobTimes, pipeline: Pipeline | None = None) -> Job:
    """Queue a job by id. RQ keeps a failure's bookkeeping as long as diffq keeps the record, and a
    success's for ``FINISHED_TTL`` seconds."""
    return queue.enqueue_call(TASK, args=[job_id], job_id=job_id, pipeline=pipeline, **_rq_options(job_id, settings))


def _rq_options(job_id: str, settings: JobTimes) -> dict[str, Any]:
    """What RQ is told about a job: by ``enqueue``, and by ``enqueue_many``'s template job."""
    return {
        "timeout": settings.job_timeout,
        "ttl": settings.job_ttl,
        # RQ keeps a success only for FINISHED_TTL (dashboards show recent ones; diffq's record is the
        # truth): its job hash and result stream are 6.7 KB of Redis per job. Failures stay longer.
        "result_ttl": min(FINISHED_TTL, settings.job_ttl),
        "failure_ttl": settings.job_ttl,
        "description": f"diffq job {job_id}",
    }


# Many jobs of one owner into a queue in one step (a chunk of a batch): each job's RQ hash (the
# fields RQ writes for a job, ARGV's template, with each job's own data and description) and its
# fair place. The first job goes through ``fair_push``; each later one takes the round after the
# one before (as ``fair_push`` would give it: the base is at most the round just given), so the
# place to insert before is found by going on from where the job before found its own, and the
# jobs with nothing after them are appended, scored and the owner's state set once per call.
# KEYS: as _FAIR_PUSH. ARGV[1..6]: owner, class, fair TTL, job record key prefix, RQ job key
# prefix, RQ job TTL; ARGV[7]: number of template strings that follow; then those field/value
# strings; then per job: id, data, description.
_ENQUEUE_MANY = (
    _FAIR_PUSH_FN
    + """
local n = tonumber(ARGV[7])
local first = 8 + n
local ids = {}
for i = first, #ARGV, 3 do
  local key = ARGV[5] .. ARGV[i]
  redis.call('HSET', key, 'data', ARGV[i + 1], 'description', ARGV[i + 2], unpack(ARGV, 8, 7 + n))
  redis.call('EXPIRE', key, ARGV[6])
  ids[#ids + 1] = ARGV[i]
end
if #ids > 0 then
  local low = tonumber(ARGV[2]) * 1000000000000
  local round = fair_push(KEYS[1], KEYS[2], KEYS[3], ids[1], ARGV[1], ARGV[2], nil, ARGV[4]) - low
  local scores, tail = {}, {}
  local after = nil  -- the first entry scored after the job being placed, or false: none
  for k = 2, #ids do
    round = round + 1
    local score = low + round
    while true do
      if after == nil or (after and tonumber(after[2]) <= score) then
        local found = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. score, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
        after = #found > 0 and found or false
      end
      if not after then
        tail[#tail + 1] = ids[k]
        break
      end
      if redis.call('LINSERT', KEYS[1], 'BEFORE', after[1], ids[k]) > 0 then break end
      redis.call('ZREM', KEYS[2], after[1])
      after = nil
    end
    scores[#scores + 1] = score
    scores[#scores + 1] = ids[k]
  end
  if #tail > 0 then redis.call('RPUSH', KEYS[1], unpack(tail)) end
  if #scores > 0 then
    redis.call('ZADD', KEYS[2], unpack(scores))
    local top_field = 'top:' .. ARGV[2]
    redis.call('HSET', KEYS[3], 'last:' .. ARGV[2] .. ':' .. ARGV[1], round)
    if round > tonumber(redis.call('HGET', KEYS[3], top_field) or '0') then
      redis.call('HSET', KEYS[3], top_field, round)
    end
  end
end
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return #ids
"""
)

#: Jobs per ``_ENQUEUE_MANY`` call: each call holds Redis for a few milliseconds at most.
ENQUEUE_CHUNK = 500
_TEMPLATE_ID = "0" * 32


def enqueue_many(queue: FairQueue, job_ids: list[str], settings: JobTimes, pipeline: Pipeline) -> None:
    """``enqueue`` many jobs (a batch's items) into one pipeline, a script call per ``ENQUEUE_CHUNK``
    jobs rather than RQ's seven commands per job. The RQ hash is the one RQ itself makes for
    a job enqueued by ``enqueue`` (``Job.to_dict`` of a template job), with each job's id in its
    data and description, so RQ and its workers cannot tell the two apart."""
    template = _rq_template(queue, settings)
    packed = zlib.decompress(template.pop("data"))
    description = str(template.pop("description"))
    fields = [item for pair in template.items() for item in pair]
    run = script(queue.connection, _ENQUEUE_MANY)
    head = [
        queue.place.owner,
        queue.place.rank,
        queue.place.ttl,
        keys.job(""),
        Job.redis_job_namespace_prefix,
        settings.job_ttl,
        len(fields),
        *fields,
    ]
    pipeline.sadd(queue.redis_queues_keys, queue.key)  # as RQ's enqueue does: the queue is known to RQ
    for start in range(0, len(job_ids), ENQUEUE_CHUNK):
        args: list[Any] = list(head)
        for job_id in job_ids[start : start + ENQUEUE_CHUNK]:
            args += [
                job_id,
                zlib.compress(packed.replace(_TEMPLATE_ID.encode(), job_id.encode())),
                description.replace(_TEMPLATE_ID, job_id),
            ]
        run(keys=[queue.key, keys.fair(queue.name), keys.fair_state(queue.name)], args=args, client=pipeline)


#: RQ's own timestamp format (``rq.utils.utcformat``).
_RQ_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
_templates: dict[tuple[str, int, int], tuple[bytes, str, dict[str, Any]]] = {}


def rq_job_fields(queue: Queue, job_id: str, settings: JobTimes) -> list[Any]:
    """The field/value strings of the hash RQ writes for job ``job_id`` when ``enqueue`` queues it,
    for a script that writes it with the job (``JobStore.submit``): ``enqueue_many``'s template,
    made once per queue and settings, with this job's id and times."""
    cache_key = (queue.name, settings.job_timeout, settings.job_ttl)
    found = _templates.get(cache_key)
    if found is None:
        template = _rq_template(queue, settings)
        packed = zlib.decompress(template.pop("data"))
        description = str(template.pop("description"))
        for name in ("created_at", "enqueued_at"):
            template.pop(name)
        template = {name: getattr(value, "value", value) for name, value in template.items()}  # enums: their text
        found = _templates[cache_key] = (packed, description, template)
    packed, description, template = found
    now = datetime.now(UTC).strftime(_RQ_TIME)
    fields: dict[str, Any] = {
        "data": zlib.compress(packed.replace(_TEMPLATE_ID.encode(), job_id.encode())),
        "description": description.replace(_TEMPLATE_ID, job_id),
        "created_at": now,
        "enqueued_at": now,
        **template,
    }
    return [item for pair in fields.items() for item in pair]


def _rq_template(queue: Queue, settings: JobTimes) -> dict[str, Any]:
    """The hash RQ writes for a job ``enqueue`` queues, for a placeholder id."""
    job = queue.create_job(
        TASK, args=[_TEMPLATE_ID], job_id=_TEMPLATE_ID, status=RQStatus.QUEUED, **_rq_options(_TEMPLATE_ID, settings)
    )
    job.origin = queue.name
    job.enqueued_at = datetime.now(UTC)
    return job.to_dict()


# Drop ids from a queue list (KEYS[1]) and its fair zset (KEYS[2]) in one pass: LREM per id would
# scan the list once per id. ARGV: the ids. Returns how many the list held.
_DROP_MANY = """
local drop = {}
for i = 1, #ARGV do drop[ARGV[i]] = true end
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
local keep = {}
for _, id in ipairs(ids) do if not drop[id] then keep[#keep + 1] = id end end
for i = 1, #ARGV, 5000 do redis.call('ZREM', KEYS[2], unpack(ARGV, i, math.min(i + 4999, #ARGV))) end
if #keep == #ids then return 0 end
redis.call('DEL', KEYS[1])
for i = 1, #keep, 5000 do redis.call('RPUSH', KEYS[1], unpack(keep, i, math.min(i + 4999, #keep))) end
return #ids - #keep
"""


def drop_many(queue: Queue, job_ids: list[str]) -> int:
    """Take canceled or deleted jobs (a batch's items) off the queue list at once; RQ's own job
    hashes are left to expire (``job_ttl``). Returns how many were on the list."""
    if not job_ids:
        return 0
    return int(script(queue.connection, _DROP_MANY)(keys=[queue.key, keys.fair(queue.name)], args=job_ids))


def mark_requeued(queue: Queue, job_id: str) -> bool:
    """RQ's side of a job that diffq has put back on the queue list itself (``JobStore.requeue``,
    ``JobStore.rescue``): forget its started executions and call it ``queued`` again. Only
    bookkeeping: the list already holds the id. False if RQ no longer has the job."""
    try:
        job = Job.fetch(job_id, connection=queue.connection, serializer=SERIALIZER)
    except NoSuchJobError:
        return False
    with queue.connection.pipeline() as pipe:
        _drop_started(queue, job, pipe)
        FinishedJobRegistry(queue.name, connection=queue.connection).remove(job, pipeline=pipe)
        job.set_status(RQStatus.QUEUED, pipeline=pipe)
        if job.ttl:  # a run that ended in RQ gave the hash its result TTL: queued, it lives a job's again
            pipe.expire(job.key, job.ttl)
        pipe.execute()
    return True


def _drop_started(queue: Queue, job: Job, pipe: Pipeline) -> None:
    """Take ``job``'s executions out of ``queue``'s started registry: the entries ``<id>:<execution>``
    there (diffq's workers keep no per-job executions set; the registry holds running jobs only,
    a few per worker), and those of an executions set an RQ-made execution left."""
    registry = StartedJobRegistry(queue.name, connection=queue.connection)
    mine = [m for m in queue.connection.zrange(registry.key, 0, -1) if m.decode().startswith(f"{job.id}:")]
    if mine:
        pipe.zrem(registry.key, *mine)
    registry.remove_executions(job, pipeline=pipe)


def end_lost(queue: Queue, job_id: str, ttl: int, reason: str) -> None:
    """RQ's side of a job diffq failed ``worker_lost``: no started executions left, status
    ``failed`` in the failed registry, and the RQ job expiring after ``ttl`` like any failure."""
    try:
        job = Job.fetch(job_id, connection=queue.connection, serializer=SERIALIZER)
    except NoSuchJobError:
        return
    with queue.connection.pipeline() as pipe:
        _drop_started(queue, job, pipe)
        job.set_status(RQStatus.FAILED, pipeline=pipe)
        FailedJobRegistry(queue.name, connection=queue.connection).add(job, ttl=ttl, exc_string=reason, pipeline=pipe)
        pipe.expire(job.key, ttl)
        pipe.execute()


def intermediate_key(queue: Queue) -> str:
    """RQ's list of job ids a worker has taken off ``queue`` (BLMOVE) and not yet started."""
    return queue.intermediate_queue_key


def taken_ids(queue: Queue) -> list[str]:
    """Ids workers have taken off ``queue``: in RQ's intermediate list, or marked started (each once)."""
    intermediate = [raw.decode() for raw in queue.connection.lrange(intermediate_key(queue), 0, -1)]
    return list(dict.fromkeys([*intermediate, *started_ids(queue)]))


def started_ids(queue: Queue) -> list[str]:
    """Ids of the jobs RQ has marked started on ``queue`` (without RQ's own cleanup)."""
    registry = StartedJobRegistry(queue.name, connection=queue.connection)
    return list(dict.fromkeys(job_id for job_id, _ in registry.get_job_and_execution_ids(cleanup=False)))


def cancel_queued(redis: Redis, job_id: str) -> None:
    """RQ's side of a job diffq has canceled while it was queued: off its queue, ``canceled`` in RQ."""
    try:
        Job.fetch(job_id, connection=redis, serializer=SERIALIZER).cancel()
    except (NoSuchJobError, InvalidJobOperation):
        pass  # RQ no longer has it, or has canceled it already


def forget(redis: Redis, model: str, job_id: str, status: JobStatus) -> None:
    """RQ's side of a job diffq has deleted; ``status`` is what diffq's record said just before.

    A running job is left to its worker, and so is a queued one that a worker has already taken
    off the queue list (it finds the record gone at its claim): RQ closes its own bookkeeping when
    that run ends. Otherwise RQ's job goes too, and off the queue list, so it never runs."""
    if status is JobStatus.RUNNING:
        return
    if status is JobStatus.QUEUED and not model_queue(model, redis).remove(job_id):
        return  # in a worker's hands already
    try:
        Job.fetch(job_id, connection=redis, serializer=SERIALIZER).delete(remove_from_queue=True)
    except NoSuchJobError:
        pass


def rq_status(job_id: str, redis: Redis) -> RQStatus | None:
    """RQ's status of a job, or ``None`` when RQ no longer has it (deleted or expired). For tests and
    dashboards only: diffq reads a job's status from its own record."""
    try:
        return Job(job_id, connection=redis).get_status(refresh=True)
    except InvalidJobOperation:
        return None


def queue_depths(redis: Redis) -> dict[str, int]:
    """Jobs waiting in each model's queue list, by model name (for ``GET /metrics``)."""
    return {
        queue.name.removeprefix(QUEUE_PREFIX): queue.count
        for queue in Queue.all(connection=redis, serializer=SERIALIZER)
        if queue.name.startswith(QUEUE_PREFIX)
    }


# -- a worker's bookkeeping in RQ ------------------------------------------------------------------------------


def set_dequeue_order(worker: BaseWorker, queues: list[Queue]) -> None:
    """The order in which ``worker``'s next dequeue looks at its queues (RQ keeps it in a private field)."""
    worker._ordered_queues = queues


def fetch_job(worker: BaseWorker, job_id: str) -> Job | None:
    """RQ's job ``job_id`` as ``worker`` would dequeue it (its job class and serializer); None if gone."""
    return worker.job_class.fetch_many([job_id], connection=worker.connection, serializer=worker.serializer)[0]


def start_execution(worker: BaseWorker, job: Job) -> Execution:
    """Mark ``job`` started by ``worker`` as ``begin_execution`` marks the job it dequeued, minus the
    worker's own single-job fields: an execution in the queue's started registry, status
    ``started``, the worker's name; one round trip. For a job diffq has taken off the queue list
    itself (a batch's company: ``diffq.worker.batching``)."""
    ttl = worker.get_heartbeat_ttl(job)
    with worker.connection.pipeline(transaction=False) as pipe:
        execution = _started(job, ttl, worker.name, pipe)
        job.prepare_for_execution(worker.name, pipeline=pipe)
        pipe.execute()
    return execution


def end_execution(worker: BaseWorker, job: Job, queue: Queue, execution: Execution, failure: str | None) -> None:
    """End a job ``start_execution`` started: ``finished`` as ``end_success`` ends one (without the
    worker's own fields), or, with ``failure`` (RQ's exception text), ``failed`` through RQ's own
    handler. RQ's handler ends the worker's current execution, so this one is made current meanwhile."""
    if failure is None:
        job.ended_at = job.last_heartbeat = datetime.now(UTC)  # what RQ's handle_execution_ended sets
        with worker.connection.pipeline(transaction=False) as pipe:
            _finished(worker, job, execution, pipe)
            pipe.execute()
        return
    worker.execution = execution
    try:
        worker.handle_execution_ended(job, queue, job.failure_callback_timeout)
        job._status = RQStatus.FAILED
        worker.handle_job_failure(
            job=job, queue=queue, started_job_registry=queue.started_job_registry, exc_string=failure
        )
    finally:
        worker.execution = None


# RQ's own per-job bookkeeping, cut to what RQ's queue and its tools need: a diffq job never has
# dependents, callbacks or repeats, its task returns nothing, and diffq's record (not RQ's) is what
# anyone reads for its status and history. So the ~40 commands RQ's handlers spend on a job (two
# transactions at its start, a WATCH on its dependents and a transaction with a result stream at
# its end, a heartbeat at every turn, an execution hash and a per-job executions set) come down to
# 10, in two round trips: RQ still shows each job's status and times, the job in the started
# registry while it runs (an execution id in ``rq:wip:<queue>``, which ``rq info`` and RQ's
# cleanup read), and each worker's state and current job. Left out: the execution hash and the
# job's executions set (nothing of diffq or of RQ's tools reads them), the finished registry (a
# finished job's RQ hash still says ``finished`` until it expires), the result stream of a
# success, and the worker's job counters per job: ``count_success`` holds them and
# ``write_counts`` adds them with RQ's worker heartbeat (once a minute). Failures keep RQ's own
# handler (its failed registry and result stream, which ``failure_text`` reads). Tests:
# tests/test_rq_adapter.py.


def _started(job: Job, ttl: int, worker_name: str, pipe: Pipeline) -> Execution:
    """An execution of ``job`` in its queue's started registry (one ZADD; no execution hash)."""
    execution = Execution(id=uuid4().hex, job_id=job.id, connection=job.connection, worker_name=worker_name)
    job.started_job_registry.add_execution(execution, pipeline=pipe, ttl=ttl, xx=False)
    return execution


def _finished(worker: BaseWorker, job: Job, execution: Execution, pipe: Pipeline) -> None:
    """``job`` finished: its status and end time, its result TTL, out of the started registry."""
    result_ttl = job.get_result_ttl(worker.default_result_ttl)
    job._status = RQStatus.FINISHED
    assert job.started_at is not None and job.ended_at is not None
    count_success(worker, (job.ended_at - job.started_at).total_seconds())
    fields = {"status": RQStatus.FINISHED.value, "ended_at": utcformat(job.ended_at)}
    if job.last_heartbeat is not None:
        fields["last_heartbeat"] = utcformat(job.last_heartbeat)
    if result_ttl == 0:
        pipe.delete(job.key)
    else:
        pipe.hset(job.key, mapping=fields)
        if result_ttl > 0:
            pipe.expire(job.key, result_ttl)
    job.started_job_registry.remove_execution(execution, pipeline=pipe)


def count_success(worker: BaseWorker, seconds: float) -> None:
    """One more successful job of ``seconds`` for RQ's worker counters, written by ``write_counts``."""
    held = worker.__dict__.setdefault("_diffq_counts", [0, 0.0])
    held[0] += 1
    held[1] += seconds


def write_counts(worker: BaseWorker, pipe: Pipeline) -> None:
    """Add the jobs ``count_success`` holds to RQ's worker counters (``successful_job_count``,
    ``total_working_time``), as RQ's ``increment_*`` would have one job at a time."""
    held = worker.__dict__.get("_diffq_counts")
    if not held or not held[0]:
        return
    pipe.hincrby(worker.key, "successful_job_count", held[0])
    pipe.hincrbyfloat(worker.key, "total_working_time", held[1])
    worker.__dict__["_diffq_counts"] = [0, 0.0]


def begin_execution(worker: BaseWorker, job: Job, remove_from_intermediate: bool) -> Execution:
    """RQ's ``prepare_execution`` and ``prepare_job_execution`` in one round trip: the execution in
    the started registry, the worker busy on the job, the job started (and off the intermediate
    list when RQ would take it off)."""
    ttl = worker.get_heartbeat_ttl(job)
    stamp = now()
    with worker.connection.pipeline(transaction=False) as pipe:
        execution = _started(job, ttl, worker.name, pipe)
        worker._state = WorkerStatus.BUSY
        worker.current_job_working_time = 0
        worker.last_heartbeat = stamp
        pipe.hset(
            worker.key,
            mapping={
                "state": WorkerStatus.BUSY.value,
                "current_job": job.id,
                "current_job_working_time": 0,
                "last_heartbeat": utcformat(stamp),
            },
        )
        keep_worker_key(worker, ttl, pipe)
        job.prepare_for_execution(worker.name, pipeline=pipe)
        if remove_from_intermediate:
            pipe.lrem(job_queue(job).intermediate_queue_key, 1, job.id)
        pipe.execute()
    worker.execution = execution
    return execution


#: Seconds RQ adds to a job's timeout for its heartbeat TTL (``SimpleWorker.get_heartbeat_ttl``).
HEARTBEAT_SLACK = 60


def keep_worker_key(worker: BaseWorker, ttl: int, pipe: Pipeline) -> None:
    """The worker's RQ key outlives a job of heartbeat TTL ``ttl`` starting now (its timeout plus
    ``HEARTBEAT_SLACK``): given ``ttl`` s (one EXPIRE) only when what it was last given
    (``worker_key_renewed``) has less than the job's timeout left, so a busy worker renews it
    about once a minute instead of at every job."""
    left = worker.__dict__.get("_diffq_key_until", 0.0) - time.monotonic()
    if left < ttl - HEARTBEAT_SLACK:
        pipe.expire(worker.key, ttl)
        worker_key_renewed(worker, ttl)


def worker_key_renewed(worker: BaseWorker, ttl: int) -> None:
    """Note that the worker's RQ key was just given ``ttl`` s to live (RQ's heartbeat, ``keep_worker_key``)."""
    worker.__dict__["_diffq_key_until"] = time.monotonic() + ttl


def job_queue(job: Job) -> Queue:
    return Queue(job.origin, connection=job.connection, serializer=SERIALIZER)


def end_success(worker: BaseWorker, job: Job) -> None:
    """RQ's ``handle_job_success`` and the worker going idle, for a diffq job, in one round trip:
    ``finished`` with its end time and its result TTL, out of the started registry, the worker
    idle with no current job (its counters held for ``write_counts``)."""
    execution = worker.execution
    assert execution is not None
    with worker.connection.pipeline(transaction=False) as pipe:
        _finished(worker, job, execution, pipe)
        worker._state = WorkerStatus.IDLE
        pipe.hset(worker.key, "state", WorkerStatus.IDLE.value)
        pipe.hdel(worker.key, "current_job")
        pipe.execute()
    worker.execution = None


def is_suspended(redis: Redis) -> bool:
    """Whether ``rq suspend`` has suspended the workers (one EXISTS; RQ's own check renews the
    worker's heartbeat in a transaction with it)."""
    return bool(redis.exists(WORKERS_SUSPENDED))


def failure_text(job: Job) -> str:
    """What RQ recorded of ``job``'s failure (its exception text), or "" if nothing readable."""
    try:
        result = job.latest_result()
        return (result.exc_string or "") if result is not None else ""
    except Exception:
        return ""


__all__ = [
    "ENQUEUE_CHUNK",
    "FINISHED_TTL",
    "QUEUE_PREFIX",
    "SERIALIZER",
    "TASK",
    "BaseWorker",
    "DeserializationError",
    "Execution",
    "FairQueue",
    "Job",
    "JobTimeoutException",
    "Place",
    "Queue",
    "SimpleWorker",
    "StopRequested",
    "WorkerStatus",
    "begin_execution",
    "cancel_queued",
    "drop_many",
    "end_execution",
    "end_lost",
    "end_success",
    "enqueue",
    "enqueue_many",
    "failure_text",
    "fetch_job",
    "forget",
    "intermediate_key",
    "is_suspended",
    "mark_requeued",
    "model_queue",
    "queue_depths",
    "queue_key",
    "queue_name",
    "rq_job_fields",
    "rq_status",
    "set_dequeue_order",
    "start_execution",
    "started_ids",
    "taken_ids",
    "worker_key_renewed",
    "write_counts",
]
